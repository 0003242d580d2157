"""Tiny end-to-end runs of the three modes, and the semantics the spine promises."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import pytest
import sacrebleu
import torch
from safetensors.torch import load_file

from fedllm.federation.modes import run_federated
from fedllm.federation.rundir import REQUIRED_METRICS, read_metrics


def rows(path: Path) -> list[dict]:
    return read_metrics(path)


def test_compare_writes_the_run_directory_contract(tiny_compare):
    for mode in ("federated", "centralized", "local"):
        d = tiny_compare / mode
        for name in ("config.yaml", "partition.json", "metrics.jsonl", "summary.json", "report.md",
                     "metrics.png", "adapter/adapter_config.json", "samples/round_0.jsonl"):
            assert (d / name).exists(), f"{mode}/{name}"
        rs = rows(d)
        assert [r["round"] for r in rs] == [0, 1, 2]
        assert all(set(REQUIRED_METRICS) <= set(r) for r in rs)
        assert all(r["mode"] == mode for r in rs)
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        assert (tiny_compare / name).exists()
    fed = rows(tiny_compare / "federated")
    assert fed[1]["bytes_up"] > 0 and fed[1]["bytes_down"] > 0 and fed[1]["clients"] == [0, 1, 2]
    local = rows(tiny_compare / "local")
    assert set(local[1]["per_client"]) == {"0", "1", "2"}
    means = [v["eval_loss"] for v in local[1]["per_client"].values()]
    assert local[1]["eval_loss"] == pytest.approx(sum(means) / 3)
    # the same partition in every mode
    parts = {m: json.loads((tiny_compare / m / "partition.json").read_text()) for m in ("federated", "local")}
    assert parts["federated"] == parts["local"]


def test_training_lowers_eval_loss(tiny_compare):
    for mode in ("federated", "centralized"):
        rs = rows(tiny_compare / mode)
        assert rs[-1]["eval_loss"] < rs[0]["eval_loss"], mode


def test_round0_perplexity_matches_direct_transformers(tiny_compare, tiny_recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from fedllm.data.coralmap import coralmap_records
    from fedllm.models.llm import tiny_dir

    path = tiny_dir(tiny_recipe.seed)
    tok = AutoTokenizer.from_pretrained(path)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.float32,
                                                 device_map={"": "cpu"}).eval()
    # the exact 4-bit path, as fedllm computes it: on CPUs with AVX512-BF16, bitsandbytes' default
    # would repack every layer for bf16 inference at this first no-grad forward
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    records = coralmap_records()
    eval_ids = json.loads((tiny_compare / "federated" / "partition.json").read_text())["eval"]
    nll, count = 0.0, 0
    for i in eval_ids:
        msgs = [{"role": "system", "content": tiny_recipe.data.system_prompt},
                {"role": "user", "content": records[i]["prompt"]},
                {"role": "assistant", "content": records[i]["response"]}]
        p = list(tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        full = list(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])[: tiny_recipe.data.max_length]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        for t in range(len(p), len(full)):
            nll -= float(logp[t - 1, full[t]])
            count += 1
    row0 = rows(tiny_compare / "federated")[0]
    assert row0["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_bleu_equals_sacrebleu_on_saved_samples(tiny_compare):
    for r in rows(tiny_compare / "federated"):
        lines = (tiny_compare / "federated" / "samples" / f"round_{r['round']}.jsonl").read_text().splitlines()
        samples = [json.loads(x) for x in lines]
        score = sacrebleu.corpus_bleu([s["prediction"] for s in samples], [[s["reference"] for s in samples]]).score
        assert r["bleu"] == pytest.approx(score, abs=1e-9)


def test_saved_adapter_loads_with_peft(tiny_compare, tiny_recipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedllm.models.llm import tiny_dir

    base = AutoModelForCausalLM.from_pretrained(tiny_dir(tiny_recipe.seed))
    model = PeftModel.from_pretrained(base, str(tiny_compare / "federated" / "adapter"))
    saved = load_file(str(tiny_compare / "federated" / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k for k in saved) and model is not None


def _run(exp, recipe, clients, tmp_path, name):
    """Run federated with a modified recipe/partition on the shared experiment, then restore it."""
    old_recipe, old_clients = exp.recipe, exp.data.clients
    exp.recipe, exp.data.clients = dataclasses.replace(recipe, name=name), clients
    try:
        run_federated(exp, str(tmp_path))
    finally:
        exp.recipe, exp.data.clients = old_recipe, old_clients
    d = tmp_path / name / "federated"
    return load_file(str(d / "adapter" / "adapter_model.safetensors")), rows(d)


def test_identical_clients_equal_one_client(tiny_experiment, tiny_recipe, tmp_path):
    shared = tiny_experiment.data.clients[0]
    k3 = dataclasses.replace(tiny_recipe, partition=dataclasses.replace(tiny_recipe.partition, num_clients=3))
    k1 = dataclasses.replace(tiny_recipe, partition=dataclasses.replace(tiny_recipe.partition, num_clients=1))
    three, _ = _run(tiny_experiment, k3, [shared] * 3, tmp_path, "k3")
    one, _ = _run(tiny_experiment, k1, [shared], tmp_path, "k1")
    assert three.keys() == one.keys()
    for k in one:
        assert torch.allclose(three[k], one[k], atol=1e-6), k
    assert any(float(v.abs().max()) > 0 for k, v in one.items() if "lora_B" in k)  # it did train


def test_zero_learning_rate_changes_nothing(tiny_experiment, tiny_recipe, tmp_path):
    lr0 = dataclasses.replace(tiny_recipe, train=dataclasses.replace(tiny_recipe.train, lr=0.0))
    state, rs = _run(tiny_experiment, lr0, tiny_experiment.data.clients, tmp_path, "lr0")
    init = tiny_experiment.initial_state
    for k, v in state.items():
        assert torch.equal(v, init[k]), k
    assert len({r["eval_loss"] for r in rs}) == 1 and len({r["bleu"] for r in rs}) == 1


def test_nonfinite_client_is_left_out_and_run_goes_on(tiny_experiment, tiny_recipe, tmp_path, caplog):
    faulty = dataclasses.replace(tiny_recipe, faults=dataclasses.replace(tiny_recipe.faults, nan_clients=[1],
                                                                          error_clients=[2], rounds=[1]))
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        _, rs = _run(tiny_experiment, faulty, tiny_experiment.data.clients, tmp_path, "nan")
    assert rs[1]["skipped_nonfinite"] == 1 and rs[1]["failed_clients"] == 1
    assert rs[1]["aggregated_clients"] == [0] and rs[2]["aggregated_clients"] == [0, 1, 2]
    assert all(math.isfinite(r["eval_loss"]) for r in rs)
    assert "non-finite" in caplog.text and "failed" in caplog.text


def test_same_recipe_same_metrics(tiny_experiment, tiny_recipe, tmp_path):
    a_state, a = _run(tiny_experiment, tiny_recipe, tiny_experiment.data.clients, tmp_path, "a")
    b_state, b = _run(tiny_experiment, tiny_recipe, tiny_experiment.data.clients, tmp_path, "b")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)
