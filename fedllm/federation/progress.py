"""A Lightning callback that advances a rich progress bar per optimizer step."""

from __future__ import annotations

import lightning as L


class StepProgress(L.Callback):
    def __init__(self, progress) -> None:
        self.progress = progress
        self.task = progress.add_task("steps", total=None)

    def label(self, text: str) -> None:
        self.progress.reset(self.task, description=text)

    def on_train_start(self, trainer, pl_module) -> None:
        self.progress.reset(self.task, total=trainer.max_steps,
                            description=self.progress.tasks[self.task].description)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.progress.advance(self.task)
