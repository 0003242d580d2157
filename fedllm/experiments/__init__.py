"""What one client's training and one evaluation are, for each task, behind one protocol.

:class:`~fedllm.experiments.base.Experiment` is the protocol the engine reads (modes, server,
the Flower coordinator); :class:`~fedllm.experiments.lm.LMExperiment` (4-bit base + LoRA) and
:class:`~fedllm.experiments.vision.VisionExperiment` (Fashion-MNIST classifiers) implement it.
This layer sits between :mod:`fedllm.client` (the LightningModules) and :mod:`fedllm.federation`
(the rounds): it imports the first and never the second.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fedllm.config import Recipe
from fedllm.experiments.base import ClientFault, Experiment, ExperimentData, FitJob, fit_each, round_seed

__all__ = ["ClientFault", "Experiment", "ExperimentData", "FitJob", "fit_each", "load_data", "make_experiment",
           "round_seed"]


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


def load_data(recipe: Recipe) -> ExperimentData:
    """The experiment's data exactly as :func:`make_experiment` builds it, without the model weights.

    ``fedllm validate`` runs it: every row check, the held-out split and the partition of a run,
    so a bad row, a missing field or an empty split is reported before anything trains. A language
    model's rows are tokenized with the tokenizer the run loads (``model.path``'s, or SmolLM2's for
    the presets), and ``model.path``'s weight files are checked for completeness (header and size).
    """
    if recipe.model.task == "vision":
        from fedllm.experiments.vision import VisionSplits  # noqa: PLC0415

        return VisionSplits(recipe)
    from fedllm.data.build import build_text_data  # noqa: PLC0415
    from fedllm.models.llm import check_weights, tokenizer_dir, user_files  # noqa: PLC0415
    from fedllm.models.targets import check_targets  # noqa: PLC0415

    user, path = recipe.model.path is not None, tokenizer_dir(recipe.model, recipe.seed)
    if user_files(recipe.model):
        check_weights(path)
        check_targets(path, recipe.lora.target_modules)  # a name matching no layer, before any weight loads
    stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(path.iterdir()) if f.is_file())
    return build_text_data(recipe, _tokenizer(str(path), user, stamp))


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, user: bool, stamp: tuple):
    """A tokenizer per directory and state of its files (``stamp``): a process that validates many
    recipes (a notebook, the tests) loads it once while its files stay as they were."""
    from fedllm.models.llm import load_tokenizer  # noqa: PLC0415

    return load_tokenizer(Path(path), user)
