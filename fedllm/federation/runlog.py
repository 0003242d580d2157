"""A run's metrics through Lightning's own loggers (``output.loggers: [csv, tensorboard]``).

The run directory (``metrics.jsonl``, ``summary.json``) stays the source of truth; these are
copies in the formats people's tools already read, under ``<run dir>/logs/``:

- ``logs/csv/metrics.csv`` (:class:`lightning.pytorch.loggers.CSVLogger`),
- ``logs/tensorboard/events.out.tfevents.*`` (:class:`lightning.pytorch.loggers.TensorBoardLogger`).

Every numeric round metric is a scalar ``round/<name>`` at step = round; every client's training
loss is ``client/<id>/step_loss`` at that client's own step count (over the whole run), logged by
:meth:`RunLoggers.callback`, a Lightning callback on the clients' fits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

LOGGERS = ("csv", "tensorboard")


class RunLoggers:
    """Lightning loggers fed with one run's rounds and its clients' step losses."""

    def __init__(self, names: list[str], path: Path) -> None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: PLC0415

        self.loggers: list[Any] = []
        for name in names:
            if name == "csv":
                self.loggers.append(CSVLogger(save_dir=str(path), name="logs", version="csv"))
            elif name == "tensorboard":
                self.loggers.append(TensorBoardLogger(save_dir=str(path), name="logs", version="tensorboard",
                                                      default_hp_metric=False))
            else:
                raise ValueError(f"unknown logger {name!r}; expected one of {LOGGERS}")
        self.client: int | str = "central"
        self.client_steps: dict[int | str, int] = {}

    def log_round(self, row: dict[str, Any]) -> None:
        """Every numeric metric of a round row (NaN/Inf kept, missing ones left out)."""
        metrics = {f"round/{k}": float(v) for k, v in row.items()
                   if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if metrics:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=int(row["round"]))

    def log_step(self, loss: float) -> None:
        step = self.client_steps.get(self.client, 0)
        self.client_steps[self.client] = step + 1
        for logger in self.loggers:
            logger.log_metrics({f"client/{self.client}/step_loss": loss}, step=step)

    def callback(self) -> Any:
        """A Lightning callback that logs each training step's loss under the current client."""
        import lightning as L  # noqa: PLC0415  (the run directory's readers need no Lightning)

        owner = self

        class StepLoss(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                losses = getattr(pl_module, "losses", None)
                if losses:
                    loss = float(losses[-1])
                    owner.log_step(loss if math.isfinite(loss) else float("nan"))

        return StepLoss()

    def finish(self, status: str = "success") -> None:
        for logger in self.loggers:
            logger.save()
            logger.finalize(status)
