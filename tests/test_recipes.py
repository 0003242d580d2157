"""Every recipe under recipes/ (recursively) validates; bad recipes exit 2 with one line."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
EDGE = ROOT / "recipes" / "edge"  # edge recipes (fedllm edge): their own loader, EdgeRecipe
# one recipe per model family, with a placeholder model.path: tests/test_families.py validates each
# with a tiny model of its family there, and checks that the placeholder is refused by name
FAMILIES = ROOT / "recipes" / "examples" / "families"
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if EDGE not in p.parents and FAMILIES not in p.parents)
EDGE_RECIPES = sorted(EDGE.rglob("*.yaml"))
FAMILY_RECIPES = sorted(FAMILIES.rglob("*.yaml"))


def test_recipes_found_recursively():
    assert any(p.parent != ROOT / "recipes" for p in RECIPES), "expected nested recipe folders too"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_validates(path):
    assert main(["validate", str(path)]) == 0


@pytest.mark.parametrize("path", EDGE_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_edge_recipe_validates(path):
    assert main(["edge", str(path), "--check"]) == 0


def test_recipe_header_says_how_to_run():
    assert EDGE_RECIPES, "expected the edge recipes under recipes/edge/"
    assert FAMILY_RECIPES, "expected the model-family recipes under recipes/examples/families/"
    for path in RECIPES + EDGE_RECIPES + FAMILY_RECIPES:
        head = path.read_text().splitlines()[:6]
        assert any("fedllm " in line and line.startswith("#") for line in head), path


@pytest.mark.parametrize("override,field", [
    ("lora.rr=4", "lora.rr"),                          # unknown key
    ("federation.rounds=abc", "federation.rounds"),    # wrong type
    ("lora.dropout=1.5", "lora.dropout"),              # out of range
    ("partition.num_clients=100000", "partition.num_clients"),  # more clients than examples (the data read)
    ("partition.method=natral", "partition.method"),   # typo in a choice
])
def test_bad_values_name_the_field(override, field, capsys):
    code = main(["validate", str(ROOT / "recipes/tiny.yaml"), override])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and field in err[0]


def test_unknown_key_suggests_nearest():
    with pytest.raises(RecipeError, match="did you mean 'lora.r'"):
        load_recipe(ROOT / "recipes/tiny.yaml", ["lora.rr=4"])


def test_missing_data_file_and_bad_yaml(tmp_path, capsys):
    assert main(["validate", str(ROOT / "recipes/tiny.yaml"), "data.builtin=null", "data.path=nope.jsonl"]) == 2
    assert "data.path" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny\n")
    assert main(["validate", str(bad)]) == 2
    assert "line" in capsys.readouterr().err


def test_more_clients_than_examples_exits_2_without_traceback(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n' * 5)
    proc = subprocess.run([sys.executable, "-m", "fedllm.cli", "run", str(ROOT / "recipes/tiny.yaml"),
                           "data.builtin=null", f"data.path={data}", "data.eval_size=1",
                           "partition.method=iid", "partition.column=null", "partition.num_clients=9",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedllm: error")]
    assert len(lines) == 1 and "partition.num_clients" in lines[0]
    assert "Traceback" not in proc.stderr


def test_validate_explain_lists_every_field_with_its_doc(capsys):
    # Prepare / Execute
    from fedllm.config import Recipe

    code = main(["validate", "--explain", str(ROOT / "recipes" / "tiny.yaml"), "privacy.dp=server",
                 "federation.weighted=false"])
    out = capsys.readouterr().out
    # Assert: every group and a few leaf fields with their values and docs
    assert code == 0
    for f in dataclasses.fields(Recipe):
        assert f"{f.name}" in out
    assert "privacy.dp = 'server'  # client-level DP" in out
    assert "lora.r = 4  # LoRA rank" in out
