"""The second progress bar of a run: a fit's optimizer steps, then an evaluation's batches and prompts.

The CLI and :func:`fedllm.run` show two rich bars: the mode's rounds, and under it this one, which
says what the process is doing now ("federated: round 2, client 1 steps", "federated: evaluating
round 2: BLEU prompts 3/6"), with a total, so that a SmolLM2 evaluation that takes minutes on a CPU
is not a silent ``steps 0/?``.
"""

from __future__ import annotations

import lightning as L


class StepProgress(L.Callback):
    """A Lightning callback (a fit's optimizer steps) and a :class:`~fedllm.client.evaluate.Meter`
    (an evaluation's loss batches and BLEU prompts) driving one task of a rich ``Progress``."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.text = "starting"
        self.task = progress.add_task(self.text, total=None)

    def label(self, text: str) -> None:
        """What comes next (a client's fit, an evaluation): the bar's description, its count cleared."""
        self.text = text
        self.progress.reset(self.task, description=text)
        self._task().total = None  # rich's reset/update keep the old total when given None: unknown until told

    def _task(self):
        return next(t for t in self.progress.tasks if t.id == self.task)  # a list, not indexed by task id

    @property
    def description(self) -> str:
        """The bar's description as rich holds it (what a test reads)."""
        return self._task().description

    def on_train_start(self, trainer, pl_module) -> None:
        self.progress.reset(self.task, total=trainer.max_steps, description=self.text)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # optimizer steps, not batches (train.grad_accum batches make one step)
        self.progress.update(self.task, completed=trainer.global_step)

    def begin(self, phase: str, total: int) -> None:
        """Meter: an evaluation phase (``"loss batches"``, ``"BLEU prompts"``) of ``total`` units."""
        self.progress.reset(self.task, total=total, description=f"{self.text}: {phase}")

    def advance(self, n: int = 1) -> None:
        """Meter: ``n`` more units of the phase done."""
        self.progress.advance(self.task, n)
