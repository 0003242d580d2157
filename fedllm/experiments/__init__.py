"""What one client's training and one evaluation are, for each task, behind one protocol.

:class:`~fedllm.experiments.base.Experiment` is the protocol the engine reads (modes, server,
the Flower coordinator); :class:`~fedllm.experiments.lm.LMExperiment` (4-bit base + LoRA) and
:class:`~fedllm.experiments.vision.VisionExperiment` (Fashion-MNIST classifiers) implement it.
This layer sits between :mod:`fedllm.client` (the LightningModules) and :mod:`fedllm.federation`
(the rounds): it imports the first and never the second.
"""

from __future__ import annotations

from fedllm.config import Recipe
from fedllm.experiments.base import ClientFault, Experiment, ExperimentData, round_seed

__all__ = ["ClientFault", "Experiment", "ExperimentData", "make_experiment", "round_seed"]


def make_experiment(recipe: Recipe) -> Experiment:
    """The experiment for the recipe's task: :class:`LMExperiment` or the vision baseline.

    Both load their model and data here, once per process; the task's heavy imports (transformers
    and peft, or the vision stack) happen only for the task asked for.
    """
    if recipe.model.task == "vision":
        from fedllm.experiments.vision import VisionExperiment  # noqa: PLC0415

        return VisionExperiment(recipe)
    from fedllm.experiments.lm import LMExperiment  # noqa: PLC0415

    return LMExperiment(recipe)
