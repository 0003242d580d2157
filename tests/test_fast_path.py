"""The fast client path (issue 33, items 1 and 2) on the tiny model built in-process:
``train.precision: bf16`` (the 4-bit base in bf16, LoRA weights and AdamW state fp32, refused where
the CPU has no bf16 instructions), the LM head on labelled positions only, length bucketing, and
the override ``train.precision=32`` read as the text it names."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from fedllm.client.lm import causal_lm_loss, make_loader
from fedllm.config import RecipeError, TrainConfig, load_recipe
from fedllm.experiments.lm import LMExperiment
from fedllm.models import precision
from fedllm.models.lean_lora import LeanForward
from fedllm.models.quant import linear4bit_layers

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
HAS_BF16 = precision.cpu_has_bf16()


def _exp(*overrides: str) -> LMExperiment:
    return LMExperiment(load_recipe(TINY, list(overrides)))


class _Spy(L.Callback):
    """Records the 4-bit layers' compute dtype at every forward and the optimizer state's dtypes."""

    def __init__(self, model) -> None:
        self.model = model
        self.compute: set[torch.dtype] = set()
        self.opt_dtypes: set[torch.dtype] = set()
        self.handles = [layer.register_forward_pre_hook(lambda m, a: self.compute.add(m.compute_dtype))
                        for _, layer in linear4bit_layers(model)]

    def on_train_start(self, trainer, pl_module) -> None:
        self.lean = [m.forward for m in self.model.modules() if isinstance(vars(m).get("forward"), LeanForward)]

    def on_train_end(self, trainer, pl_module) -> None:
        self.lean_weights = {f.weight.dtype for f in self.lean}
        self.lean_calls = min((f.calls for f in self.lean), default=0)
        for st in trainer.optimizers[0].state.values():
            self.opt_dtypes |= {v.dtype for v in st.values() if torch.is_tensor(v) and v.dim() > 0}
        for h in self.handles:
            h.remove()


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512-BF16/AMX: bf16 is refused here (tested below)")
def test_bf16_trains_the_base_in_bf16_with_fp32_master_weights_and_optimizer_state():
    exp = _exp("train.precision=bf16", "train.lr=0.01")
    examples, start = exp.data.client_examples(0), exp.initial_state
    before = exp.evaluate(start).eval_loss
    spy = _Spy(exp.model)
    exp.step_callbacks.append(spy)
    upd = exp.fit(0, examples, start, 1, 4)
    assert spy.compute == {torch.bfloat16}  # every 4-bit layer peft runs dequantized to and multiplied in bf16
    # the LoRA layers (q_proj, v_proj) ran the lean path over their base dequantized once to bf16
    assert len(spy.lean) == 2 * exp.model.config.num_hidden_layers and spy.lean_weights == {torch.bfloat16}
    assert spy.lean_calls > 0
    assert spy.opt_dtypes == {torch.float32}  # AdamW's exp_avg / exp_avg_sq
    assert {p.dtype for p in exp.state.params.values()} == {torch.float32}
    assert {v.dtype for v in upd.delta.values()} == {torch.float32}
    assert max(float(v.abs().max()) for v in upd.delta.values()) > 0
    # after the fit the base is back on the exact fp32 path: evaluation is the same as under precision 32
    assert {layer.compute_dtype for _, layer in linear4bit_layers(exp.model)} == {torch.float32}
    after = exp.evaluate({k: start[k] + upd.delta[k] for k in start}).eval_loss
    assert after < before
    drops = [d for m in exp.model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(type(d) is torch.nn.Dropout for d in drops)  # the fit's FastDropout is gone again
    assert all("forward" not in vars(m) for m in exp.model.modules())  # and so are the lean forwards


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no AVX512-BF16/AMX")
def test_bf16_run_files_say_which_numerics_trained_and_evaluated(tmp_path):
    from fedllm.cli import main

    assert main(["run", str(TINY), "--out", str(tmp_path), "train.precision=bf16", "federation.rounds=2",
                 "train.lr=0.01", "eval.bleu_samples=0", "output.save_adapter=false"]) == 0
    run = tmp_path / "tiny" / "federated"
    machine = json.loads((run / "summary.json").read_text())["machine"]
    assert machine["train_precision"] == "bf16" and machine["train_base_compute_dtype"] == "bfloat16"
    # on a CPU the rest of the step stays fp32, without autocast (its casts cost more than it gains)
    assert machine["train_autocast"] is None and machine["train_head_positions"] == "labeled"
    assert machine["eval_base_compute_dtype"] == "float32" and machine["4bit_kernel"] == "exact"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]


def test_bf16_autocasts_on_a_gpu_only():
    from fedllm.client.fit import lightning_precision

    assert lightning_precision("bf16", "cpu") == "32-true" and lightning_precision("bf16", "gpu") == "bf16-mixed"
    assert lightning_precision("bf16-mixed", "cpu") == "bf16-mixed" and lightning_precision("32", "gpu") == "32-true"
    assert precision.precision_info("bf16", "auto", "cuda")["train_autocast"] == "bfloat16"
    assert precision.precision_info("bf16", "auto", "cpu")["train_autocast"] is None


def test_the_default_path_records_exact_fp32():
    info = precision.precision_info("32", "auto", "cpu")
    assert info["train_precision"] == "32" and info["train_base_compute_dtype"] == "float32"
    assert info["train_autocast"] is None and info["train_head_positions"] == "all"


def test_bf16_is_refused_where_the_cpu_has_no_bf16_instructions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_avx512_bf16", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)
    with pytest.raises(RecipeError, match=r"^train\.precision: bf16 needs a CPU with AVX512-BF16 or AMX-BF16.*slower "
                                          r"than fp32.*use 32"):
        _exp("train.precision=bf16", "model.device=cpu")
    precision.check_precision("32", "cpu")  # the exact path needs nothing
    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)  # AMX alone is enough
    precision.check_precision("bf16", "cpu")


def test_bf16_is_refused_with_dp_sgd_and_on_vision():
    with pytest.raises(RecipeError, match=r"^train\.precision: DP-SGD"):
        load_recipe(TINY, ["train.precision=bf16", "privacy.dpsgd=true"])
    with pytest.raises(RecipeError, match=r"^train\.(precision|head_positions|length_bucketing)"):
        load_recipe(ROOT / "recipes" / "tests" / "tiny_fedavg_iid.yaml",
                    ["model.preset=lenet300100", "data.builtin=fashion_mnist", "train.length_bucketing=4"])


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_the_labeled_positions_loss_equals_the_full_logits_loss(quant):
    """The same mean over the same terms; only the order of the fp32 sums differs, so the loss agrees
    to 1e-6 relative (measured: 1 ulp-scale, 9.5e-7 at 10.8) and the LoRA gradients to 1e-5 relative."""
    exp = _exp(f"model.quantization={quant}", "lora.dropout=0.0")
    batch = next(iter(make_loader(exp.data.client_examples(0), 4, exp.tokenizer.pad_token_id, 0)))
    assert bool((batch["labels"][:, 1:] == -100).any())  # prompts and padding: positions without a label
    params = [p for p in exp.state.parameters() if p.requires_grad]
    exp.state.set({k: v + 0.01 * torch.randn_like(v) for k, v in exp.initial_state.items()})  # B != 0: real grads

    def loss_and_grads(labeled: bool):
        exp.model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(exp.model, batch, labeled)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    full, g_full = loss_and_grads(False)
    assert torch.equal(full, exp.model(**batch).loss.detach())  # labeled_only=False is HF's loss itself
    lean, g_lean = loss_and_grads(True)
    assert abs(float(lean - full)) <= 1e-6 * abs(float(full))
    for a, b in zip(g_full, g_lean):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7 * float(a.abs().max()))
    exp.model.zero_grad(set_to_none=True)


def test_head_positions_auto_is_labeled_only_under_bf16():
    assert precision.resolve_head_positions("auto", "32") == "all"
    assert precision.resolve_head_positions("auto", "bf16") == "labeled"
    assert precision.resolve_head_positions("labeled", "32") == "labeled"
    assert TrainConfig().head_positions == "auto" and TrainConfig().length_bucketing == 0


def _batches(examples, seed: int, bucketing: int) -> tuple[list[int], list[list[int]]]:
    """(padded width, example lengths) of each batch of one pass of a fresh loader."""
    batches = list(make_loader(examples, 4, 0, seed, bucketing))
    return [b["input_ids"].shape[1] for b in batches], [b["attention_mask"].sum(1).tolist() for b in batches]


def test_length_bucketing_is_opt_in_seeded_and_pads_less():
    exp = _exp()
    examples = exp.data.client_examples(0)
    # off (the default): exactly the historical shuffling loader
    gen = torch.Generator().manual_seed(5)
    plain = torch.utils.data.DataLoader(examples, batch_size=4, shuffle=True, generator=gen, collate_fn=lambda b: b)
    want = [[len(e.input_ids) for e in b] for b in plain]
    assert _batches(examples, 5, 0)[1] == want
    # on: seeded (same seed, same batches; another seed, others), every example once a pass, less padding
    one, again, other = _batches(examples, 5, 4), _batches(examples, 5, 4), _batches(examples, 6, 4)
    assert one == again and one != other
    assert sorted(n for b in one[1] for n in b) == sorted(len(e.input_ids) for e in examples)
    padded = lambda widths, lens: sum(w * len(x) - sum(x) for w, x in zip(widths, lens))  # noqa: E731
    assert padded(*one) < padded(*_batches(examples, 5, 0))
    with pytest.raises(RecipeError, match=r"^train\.length_bucketing"):
        load_recipe(TINY, ["train.length_bucketing=-1"])


def test_length_bucketing_trains_through_the_recipe():
    exp = _exp("train.length_bucketing=2")
    upd = exp.fit(0, exp.data.client_examples(0), exp.initial_state, 1, 2)
    assert upd.local_steps == 2 and max(float(v.abs().max()) for v in upd.delta.values()) > 0


def test_a_literal_of_strings_takes_the_override_scalar_as_its_text(tmp_path, capsys):
    from fedllm.cli import main

    assert load_recipe(TINY, ["train.precision=32"]).train.precision == "32"  # YAML reads 32 as an int
    assert main(["validate", str(TINY), "--recipe-only", "train.precision=32"]) == 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY.read_text().replace("lr: 0.001}", "lr: 0.001, precision: 32}"))
    assert load_recipe(recipe).train.precision == "32"  # unquoted in a file too
    with pytest.raises(RecipeError, match=r"^train\.precision: expected one of '32', 'bf16'.*got 33"):
        load_recipe(TINY, ["train.precision=33"])
    assert main(["validate", str(TINY), "--recipe-only", "train.precision=33"]) != 0
    with pytest.raises(RecipeError, match=r"^train\.noop_guard"):
        load_recipe(TINY, ["train.noop_guard=1"])  # a number that is none of the names stays an error
