"""A Lightning strategy for a model that is shared by every simulated client and never moves.

Lightning's single-device strategy moves the LightningModule to its device when a ``fit`` starts
(``model_to_device``) and back to the CPU when it ends (``Strategy.teardown`` calls
``lightning_module.cpu()`` unconditionally in Lightning 2.6). fedllm runs one ``fit`` per client
per round on one shared model, so on CUDA that would carry the whole 4-bit base across the bus
twice per client, and leave it on the CPU for the server's evaluation.

:class:`SharedModelStrategy` places nothing: the experiment puts the model on its device once, at
load time, and the strategy checks that it is there when a fit starts and leaves it there when the
fit ends. Batches still move to the device as usual (``batch_to_device``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.type != "cuda" or (a.index or 0) == (b.index or 0)


class SharedModelStrategy(SingleDeviceStrategy):
    """Single device; the model is already on it and stays there (no ``.to``/``.cpu`` in a fit)."""

    strategy_name = "fedllm_shared_model"

    def model_to_device(self) -> None:
        assert self.model is not None, "the strategy has no model"
        for name, p in self.model.named_parameters():
            if not _same_device(p.device, self.root_device):
                raise RuntimeError(f"parameter {name} is on {p.device}, the trainer on {self.root_device}: "
                                   "place the shared model on its device once, when it is loaded")

    def teardown(self) -> None:
        # Lightning's teardown minus ``lightning_module.cpu()``: the shared model stays put, and
        # the optimizer (rebuilt by every fit) is simply dropped with the trainer.
        assert self.accelerator is not None
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


@contextlib.contextmanager
def recording_moves(model: torch.nn.Module) -> Iterator[list[str]]:
    """Record every ``Module._apply`` (behind ``.to``, ``.cpu``, ``.cuda``, ``.float``, ...) on any
    module holding a parameter of ``model`` (the model itself or e.g. a LightningModule wrapping
    it) while the block runs; yields the list of those modules' class names."""
    shared = {id(p) for p in model.parameters()}
    moved: list[str] = []
    original = torch.nn.Module._apply

    def recording(self, fn, *args, **kwargs):
        if any(id(p) in shared for p in self.parameters()):
            moved.append(type(self).__name__)
        return original(self, fn, *args, **kwargs)

    torch.nn.Module._apply = recording
    try:
        yield moved
    finally:
        torch.nn.Module._apply = original


def trainer_device(accelerator: str) -> torch.device:
    """The device a trainer with ``accelerator`` ("cpu" or "gpu") runs on."""
    return torch.device("cuda", torch.cuda.current_device()) if accelerator == "gpu" else torch.device("cpu")
