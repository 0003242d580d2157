"""The progress bars say what the process is doing (issue 35): the step bar of centralized and local
runs is named after its own mode (it once read "federated: rounds": ``progress.tasks`` is a list,
not indexed by task id), an evaluation shows its loss batches and BLEU prompts with totals, local
mode's rounds bar moves with each client's rounds, and quiet runs draw nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.progress import Progress

from fedllm import api
from fedllm.config import load_recipe
from fedllm.federation.progress import StepProgress

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
OVERRIDES = ["federation.rounds=2", "train.local_steps=2", "data.max_examples=48", "data.eval_size=6",
             "eval.batch_size=4", "eval.bleu_samples=3", "eval.max_new_tokens=2", "output.plots=false"]


class Recording(Progress):
    """A rich Progress that draws nothing and records (description, completed, total) of every change."""

    def __init__(self) -> None:
        super().__init__(disable=True)
        self.seen: list[tuple[str, float, float | None]] = []

    def _log(self, task_id) -> None:
        t = next(t for t in self.tasks if t.id == task_id)
        self.seen.append((t.description, t.completed, t.total))

    def reset(self, task_id, **kwargs) -> None:
        super().reset(task_id, **kwargs)
        self._log(task_id)

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)


def test_the_step_bar_keeps_its_own_label_when_training_starts():
    """Regression: with a task removed before it, the step bar's id no longer equals its list index."""
    bars = Recording()
    setup = bars.add_task("loading model and data", total=None)
    bars.remove_task(setup)
    steps = StepProgress(bars)
    bars.add_task("federated: rounds", total=2)
    steps.label("centralized: round 1 steps")

    class Trainer:
        max_steps, global_step = 6, 0

    steps.on_train_start(Trainer(), None)
    assert steps.description == "centralized: round 1 steps" and bars.seen[-1][2] == 6


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One tiny centralized and local run (one experiment, as ``fedllm compare`` shares it) behind a recording bar."""
    bars = Recording()
    old = api._progress
    api._progress = lambda enabled: bars
    try:
        recipe = load_recipe(TINY, OVERRIDES)
        api._run_modes(recipe, ["centralized", "local"], str(tmp_path_factory.mktemp("runs")))
    finally:
        api._progress = old
    return bars.seen, recipe


def test_centralized_and_local_bars_are_labelled_by_their_own_mode(recorded):
    seen, recipe = recorded
    labels = [d for d, _, _ in seen]
    assert not any(d.startswith("federated") for d in labels), sorted(set(labels))
    # training: the step bar is named and has the fit's step count as its total
    steps = recipe.train.local_steps * recipe.partition.num_clients  # centralized: the federation's steps
    assert ("centralized: round 1 steps", steps, steps) in seen
    assert ("local: client 2, round 2 steps", recipe.train.local_steps, recipe.train.local_steps) in seen


def test_an_evaluation_shows_its_batches_and_bleu_prompts_with_totals(recorded):
    seen, recipe = recorded
    batches = -(-recipe.data.eval_size // recipe.eval.batch_size)
    for who in ("centralized: evaluating round 0", "centralized: evaluating round 2",
                "local: evaluating client 1, round 1"):
        assert (f"{who}: loss batches", batches, batches) in seen, who
        assert (f"{who}: BLEU prompts", 3, 3) in seen, who
        assert (f"{who}: BLEU prompts", 0, 3) in seen, who  # announced before the first prompt is answered


def test_local_rounds_bar_moves_with_each_clients_rounds(recorded):
    seen, recipe = recorded
    for k in range(recipe.partition.num_clients):
        done = [c for d, c, total in seen if d == f"local: client {k} rounds" and total == 2]
        assert 0 in done and 1 in done, (k, done)  # 1/2 while its second round trains, not 0/2 then a jump


def test_quiet_runs_draw_nothing(capsys):
    """--quiet (and output that is not a terminal, as under pytest) turn the bars off."""
    assert api._progress(False).disable and api._progress(True).disable  # pytest's stdout is no terminal
    from fedllm.cli import _parser

    args = _parser().parse_args(["run", str(TINY), "--quiet"])
    assert args.quiet


def test_a_meter_changes_no_number(tiny_experiment):
    """The same evaluation with and without a bar listening: equal results, bit for bit."""
    exp = tiny_experiment
    plain = exp.evaluate(exp.initial_state)
    steps = StepProgress(Recording())
    exp.step_callbacks.append(steps)
    try:
        metered = exp.evaluate(exp.initial_state)
    finally:
        exp.step_callbacks.remove(steps)
    assert metered == plain and metered.example_sums == plain.example_sums
    assert steps.progress.seen[-1][0].endswith("BLEU prompts")  # it did listen
