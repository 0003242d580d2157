"""The numeric path is the same on every machine, and a run that trains nothing never looks fine.

- bitsandbytes packs 4-bit weights into a bf16 inference layout on CPUs with AVX512-BF16 (no
  backward, other numerics); fedllm's loader switches that off and every fit checks it.
- Lightning moves the LightningModule (and with it the shared base) at every fit's start and end;
  fedllm's strategy must not, so on CUDA the base never leaves the GPU.
- The engine's guard turns "no gradient" and "every update exactly zero" into an error (exit 3).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedllm.errors import IntegrityError
from fedllm.federation.guard import NoTrainingError, check_progress
from fedllm.federation.modes import run_centralized, run_federated, run_local
from fedllm.models.quant import (
    KernelError,
    bnb_says_avx512_bf16,
    check_exact_kernels,
    cpu_has_avx512_bf16,
    is_packed,
    kernel_info,
    linear4bit_layers,
)
from fedllm.types import ClientUpdate
from tests._toy import ToyExperiment, toy_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")


def _with(recipe, **groups):
    """``recipe`` with fields of its groups replaced: ``_with(r, train={"lr": 0.0})``."""
    return dataclasses.replace(recipe, **{g: dataclasses.replace(getattr(recipe, g), **f) for g, f in groups.items()})


# ----------------------------------------------------------------------------- the 4-bit CPU kernel


def test_loader_puts_every_4bit_layer_on_the_exact_path(tiny_experiment):
    layers = list(linear4bit_layers(tiny_experiment.model))
    assert layers, "the tiny nf4 preset must have bitsandbytes Linear4bit layers"
    assert all(layer.support_avx512bf16_for_cpu is False for _, layer in layers)
    assert check_exact_kernels(tiny_experiment.model) == len(layers)
    info = kernel_info(tiny_experiment.model)
    assert info["4bit_kernel"] == "exact" and info["linear4bit_layers"] == len(layers)
    assert info["cpu_avx512_bf16"] == cpu_has_avx512_bf16()


def test_train_after_evaluate_changes_the_adapter(tiny_experiment):
    # Prepare: the round-0 evaluation that used to pack every layer on AVX512-BF16 CPUs
    exp = tiny_experiment
    start = exp.initial_state
    exp.evaluate(start)
    assert not any(is_packed(layer) for _, layer in linear4bit_layers(exp.model))
    # Execute
    upd = exp.fit(0, exp.data.client_examples(0), start, rnd=1, steps=2)
    # Assert: every backward pass reached the adapter and the adapter moved
    assert upd.grad_steps == 2 == upd.local_steps
    assert any(bool(v.ne(0).any()) for v in upd.delta.values())
    assert not any(is_packed(layer) for _, layer in linear4bit_layers(exp.model))


def test_a_layer_that_could_pack_stops_training(tiny_experiment):
    exp = tiny_experiment
    name, layer = next(iter(linear4bit_layers(exp.model)))
    layer.support_avx512bf16_for_cpu = True
    try:
        with pytest.raises(KernelError, match=name):
            exp.fit(0, exp.data.client_examples(0), exp.initial_state, rnd=1, steps=1)
    finally:
        layer.support_avx512bf16_for_cpu = False


@pytest.mark.skipif(not bnb_says_avx512_bf16(),
                    reason="this CPU has no AVX512-BF16: bitsandbytes' packed CPU kernel cannot run here")
def test_packed_kernel_path_on_an_avx512_bf16_cpu(tiny_recipe):
    """Where the CPU has the flag: bitsandbytes' default would pack; fedllm's loader does not."""
    from fedllm.models.llm import load_base

    base, _ = load_base(tiny_recipe.model, tiny_recipe.seed)
    base.eval()
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = base(input_ids=ids).logits
    layers = [layer for _, layer in linear4bit_layers(base)]
    assert not any(is_packed(x) for x in layers), "fedllm's loader must keep every layer unpacked"
    for x in layers:  # bitsandbytes' own default on this CPU
        x.support_avx512bf16_for_cpu = True
    with torch.no_grad():
        packed = base(input_ids=ids).logits
    assert all(is_packed(x) for x in layers), "this machine should exercise bitsandbytes' packed path"
    print(f"packed vs exact logits on the tiny model: max |diff| {float((packed - exact).abs().max()):.3g}")
    with pytest.raises(KernelError, match="packed"):
        check_exact_kernels(base)


# ----------------------------------------------------------------------------- the shared model never moves


def test_lightning_itself_would_move_the_module_to_cpu_at_teardown():
    """Confirms the hazard: Lightning 2.6's Strategy.teardown calls ``lightning_module.cpu()``."""
    import inspect

    from lightning.pytorch.strategies import Strategy

    assert "lightning_module.cpu()" in inspect.getsource(Strategy.teardown)


def test_a_round_never_moves_or_casts_the_shared_model(tiny_experiment, tmp_path):
    # Prepare: record every Module._apply (behind .to, .cpu, .cuda, .float, ...) on a module that
    # holds a parameter of the shared model, e.g. the LightningModule wrapping it
    from fedllm.client.strategy import recording_moves

    exp = tiny_experiment
    recipe = _with(exp.recipe, federation={"rounds": 1}, eval={"bleu_samples": 0})
    # Execute
    with recording_moves(exp.model) as moved:
        run_federated(_Rebound(exp, recipe), out=str(tmp_path))
    # Assert
    assert moved == [], f"the shared model was moved or cast during a round by: {sorted(set(moved))}"


class _Rebound:
    """The session's experiment with another recipe (same model and data)."""

    def __init__(self, exp, recipe) -> None:
        self._exp, self.recipe = exp, recipe

    def __getattr__(self, name):
        return getattr(self._exp, name)


def test_the_strategy_refuses_a_model_that_is_not_on_its_device():
    import lightning as L

    from fedllm.client.strategy import SharedModelStrategy

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2, device="meta"))

    strategy = SharedModelStrategy(device=torch.device("cpu"))
    strategy.model = Tiny()
    with pytest.raises(RuntimeError, match="place the shared model on its device once"):
        strategy.model_to_device()


# ----------------------------------------------------------------------------- the no-op guard


def _upd(k: int, value: float, grad_steps: int | None = 3) -> ClientUpdate:
    return ClientUpdate(k, {"w": torch.full((3,), value)}, 5, 3, 1.0, grad_steps=grad_steps)


def test_guard_rules():
    recipe = toy_recipe()
    check_progress(recipe, [_upd(0, 0.0), _upd(1, 0.5)], "r")  # one zero update among trained ones: fine
    check_progress(recipe, [_upd(0, 0.0, grad_steps=None)] * 0, "r")  # nothing arrived: the server's business
    with pytest.raises(NoTrainingError, match="r: all 2 finite updates are exactly zero"):
        check_progress(recipe, [_upd(0, 0.0), _upd(1, 0.0)], "r")
    with pytest.raises(NoTrainingError, match="client 1 ran 3 optimizer steps .* no trainable parameter"):
        check_progress(recipe, [_upd(0, 0.5), _upd(1, 0.5, grad_steps=0)], "r")
    nan = ClientUpdate(2, {"w": torch.full((3,), float("nan"))}, 5, 3, 1.0)
    with pytest.raises(NoTrainingError, match="the only finite update is exactly zero"):
        check_progress(recipe, [_upd(0, 0.0), nan], "r")
    check_progress(_with(recipe, train={"lr": 0.0}), [_upd(0, 0.0, grad_steps=0)], "r")  # lr 0: deliberate
    check_progress(_with(recipe, train={"noop_guard": "warn"}), [_upd(0, 0.0, grad_steps=0)], "r")
    assert issubclass(NoTrainingError, IntegrityError) and issubclass(KernelError, IntegrityError)


class _ZeroToy(ToyExperiment):
    """A toy whose clients return exactly-zero updates (a cut backward pass)."""

    def fit(self, client_id, examples, start, rnd, steps, grad_term=None):
        upd = super().fit(client_id, examples, start, rnd, steps, grad_term)
        return dataclasses.replace(upd, delta={k: torch.zeros_like(v) for k, v in upd.delta.items()})


@pytest.mark.parametrize("runner", [run_federated, run_centralized, run_local])
def test_every_mode_stops_when_training_changes_nothing(runner, tmp_path):
    exp = _ZeroToy(toy_recipe())
    with pytest.raises(NoTrainingError, match="exactly zero"):
        runner(exp, out=str(tmp_path))
    assert not list(tmp_path.rglob("summary.json")), "a run stopped by the guard must not look finished"


def test_an_integrity_error_in_a_client_is_not_skipped_as_a_failing_client(tmp_path):
    class Broken(ToyExperiment):
        def fit(self, *args, **kwargs):
            raise KernelError("4-bit layer x is packed")

    with pytest.raises(KernelError):
        run_federated(Broken(toy_recipe()), out=str(tmp_path))


def test_fedllm_run_exits_3_with_one_line_when_no_gradient_reaches_the_adapter(tmp_path, monkeypatch, capsys):
    # Prepare: the backward pass never reaches the adapter (as with bitsandbytes' packed kernel)
    from fedllm.cli import EXIT_UNTRUSTED, main
    from fedllm.client.lm import CausalLMModule

    def cut(self, batch, batch_idx):
        loss = self.model(**batch).loss.detach().requires_grad_(True)
        self.losses.append(float(loss))
        return loss

    monkeypatch.setattr(CausalLMModule, "training_step", cut)
    # Execute
    code = main(["run", str(TINY), "--out", str(tmp_path), "federation.rounds=1", "eval.bleu_samples=0"])
    # Assert
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedllm: error:")]
    assert code == EXIT_UNTRUSTED == 3
    assert len(err) == 1 and "no trainable parameter ever received a non-zero gradient" in err[0], err
    assert not (tmp_path / "tiny" / "federated" / "summary.json").exists()


@pytest.mark.skipif(not FMNIST.is_file(), reason="dataset-fashion-mnist is not installed")
def test_vision_clients_are_guarded_too(tmp_path, monkeypatch):
    from fedllm.client.vision import VisionClassifier
    from fedllm.config import Recipe as R
    from fedllm.config import build
    from fedllm.experiments import make_experiment

    def cut(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y).detach().requires_grad_(True)
        self.losses.append(float(loss))
        return loss

    recipe = build(R, {
        "name": "vision_guard", "seed": 0, "model": {"preset": "lenet300100"},
        "data": {"builtin": "fashion_mnist", "max_examples": 200, "eval_size": 100, "open_data": 0},
        "partition": {"method": "iid", "num_clients": 2},
        "federation": {"algorithm": "fedavg", "rounds": 1, "fraction": 1.0},
        "train": {"optimizer": "sgd", "lr": 0.1, "batch_size": 20, "local_steps": 2, "weight_decay": 0.0,
                  "max_grad_norm": 0.0, "warmup_ratio": 0.0},
        "checkpoint": {"enabled": False}, "output": {"save_adapter": False, "plots": False}})
    exp = make_experiment(recipe)
    upd = exp.fit(0, exp.data.client_examples(0), exp.initial_state, 1, 2)
    assert upd.grad_steps == 2  # the real path reaches the weights
    monkeypatch.setattr(VisionClassifier, "training_step", cut)
    with pytest.raises(NoTrainingError, match="no trainable parameter"):
        run_federated(exp, out=str(tmp_path))
