"""The Python API (fedllm.run / compare / load_run): typed results read back from the run files,
the same files and numbers as the CLI, and an ``import fedllm`` that stays cheap."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import fedllm
from fedllm.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
# One round of one step a client, scored on 4 held-out examples: these tests check what the API
# returns and reads back (files, rows, tables), which no step or eval count changes.
FAST = ("federation.rounds=1", "eval.bleu_samples=0", "train.local_steps=1", "data.eval_size=4")


def test_import_fedllm_is_cheap_and_the_api_is_lazy():
    code = ("import sys, fedllm; heavy = [m for m in ('torch', 'pandas', 'lightning', 'fedllm.api') if m in sys.modules];"
            "print(heavy); fedllm.run; print('fedllm.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"
    assert {"run", "compare", "load_run", "RunResult"} <= set(dir(fedllm))
    with pytest.raises(AttributeError):
        fedllm.no_such_thing  # noqa: B018


def test_run_returns_the_run_directory_read_back(tmp_path):
    result = fedllm.run(TINY, *FAST, out=tmp_path, mode="centralized", progress=False)
    assert isinstance(result, fedllm.RunResult)
    assert result.dir == tmp_path / "tiny" / "centralized" and result.mode == "centralized"
    assert result.ok and result.finished and result.status == "ok"
    assert isinstance(result.metrics, pd.DataFrame) and list(result.metrics["round"]) == [0, 1]
    summary = json.loads((result.dir / "summary.json").read_text())
    assert result.summary == summary
    assert result.final["eval_loss"] == pytest.approx(result.metrics["eval_loss"].iloc[-1])
    assert result.adapter == result.dir / "adapter" and (result.adapter / "adapter_config.json").is_file()
    assert {"config.yaml", "metrics.jsonl", "summary.json", "report.md", "metrics.png"} <= set(result.files)
    assert result.config["train"]["lr"] == load_recipe(TINY).train.lr
    again = fedllm.load_run(result.dir)
    pd.testing.assert_frame_equal(again.metrics, result.metrics)
    fig = result.figure()
    assert len(fig.axes) >= 3 and fig.axes[0].get_xlabel()


def test_compare_returns_the_three_modes_and_the_comparison_table(tmp_path):
    recipe = load_recipe(TINY)  # a Recipe object takes overrides too
    cmp = fedllm.compare(recipe, *FAST, out=tmp_path, progress=False)
    assert isinstance(cmp, fedllm.Comparison) and cmp.ok and cmp.dir == tmp_path / "tiny"
    assert list(cmp.runs) == ["federated", "centralized", "local"] and list(cmp.table.index) == list(cmp.runs)
    table = json.loads((cmp.dir / "comparison.json").read_text())
    for mode, run in cmp.runs.items():
        assert cmp.table.loc[mode, "final_eval_loss"] == table[mode]["final_eval_loss"] == run.rows[-1]["eval_loss"]
        assert run.summary["invocation"] == cmp.runs["federated"].summary["invocation"]
    assert set(cmp.metrics["mode"]) == set(cmp.runs) and len(cmp.metrics) == 6
    assert set(cmp.files) == {"comparison.md", "comparison.json", "comparison.png"}
    assert len(cmp.figure().axes) >= 3
    with pytest.raises(RecipeError, match="load_comparison"):
        fedllm.load_run(cmp.dir)
    assert fedllm.load_comparison(cmp.dir).table.equals(cmp.table)


def test_cli_compare_and_api_read_the_same_files(tiny_compare):
    cmp = fedllm.load_comparison(tiny_compare)
    table = json.loads((tiny_compare / "comparison.json").read_text())
    assert cmp.table.to_dict(orient="index").keys() == table.keys()
    assert all(r.ok for r in cmp.runs.values())


def test_bad_input_is_a_one_line_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match=r"lora\.rr: unknown key; did you mean 'lora\.r'"):
        fedllm.run(TINY, "lora.rr=4", out=tmp_path)
    with pytest.raises(RecipeError, match="expected one of federated"):
        fedllm.run(TINY, out=tmp_path, mode="fed")
    with pytest.raises(RecipeError, match="holds no metrics.jsonl"):
        fedllm.load_run(tmp_path)
