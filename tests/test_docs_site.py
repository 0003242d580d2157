"""The front door: the README stays short and true (its quickstart commands run and print what it
says, its data example is the shipped recipe, its headline numbers are the study's), and the
documentation site builds with ``mkdocs build --strict`` with generated reference pages."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedllm.config import explain, load_recipe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FEDLLM = str(Path(sys.executable).with_name("fedllm"))


def _gen_reference():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(text: str, heading: str) -> str:
    return text.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first = _blocks(text, "bash")[0]
    assert [line.split()[:2] for line in first.splitlines()] == [["make", "demo"], ["make", "test"]]
    for link in re.findall(r"\]\((docs/[^)#]+)", text):  # every link into the docs names a real file
        assert (ROOT / link).exists(), link


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")]


@pytest.mark.slow
def test_readme_quickstart_commands_run_and_print_what_the_readme_shows(tmp_path):
    """Every command of the README's quickstart, as written, with its run folder in a temp dir."""
    section = _section(README.read_text(), "Quickstart")
    commands = _blocks(section, "bash")[0].strip().splitlines()
    expected = _blocks(section, "text")[0].strip().splitlines()
    assert [c.split()[:2] for c in commands] == [["fedllm", "validate"], ["fedllm", "run"], ["fedllm", "report"]]
    tutorial = (ROOT / "docs" / "tutorials" / "quickstart.md").read_text()
    assert _blocks(tutorial, "bash")[0].strip().splitlines() == commands  # the docs page runs the same
    assert set(expected) <= set(_blocks(tutorial, "text")[0].splitlines())  # and shows the same output
    out = str(tmp_path / "quickstart")
    printed = ""
    env = {**os.environ, "COLUMNS": "80"}
    for command in commands:
        argv = [FEDLLM, *command.replace("runs/quickstart", out).split()[1:]]
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        printed += done.stdout
    lines = printed.splitlines()
    for want in expected:
        want = want.replace("runs/quickstart", out)
        if want.startswith("│"):  # a table row: every cell but the wall time must match
            rows = [_cells(line) for line in lines if line.startswith("│") and _cells(line)[0] == _cells(want)[0]]
            assert rows and rows[0][:-1] == _cells(want)[:-1], (want, rows)
        else:
            assert want in lines, (want, printed[-3000:])


def test_readme_data_example_is_the_shipped_recipe_and_validates():
    section = _section(README.read_text(), "Bring your own data")
    shown = yaml.safe_load(_blocks(section, "yaml")[0])
    recipe = yaml.safe_load((ROOT / "recipes" / "byo_data.yaml").read_text())

    def subset(a, b, where=""):
        for k, v in a.items():
            assert k in b, f"{where}{k} not in recipes/byo_data.yaml"
            subset(v, b[k], f"{where}{k}.") if isinstance(v, dict) else None
            assert isinstance(v, dict) or v == b[k], f"{where}{k}: README {v!r}, recipe {b[k]!r}"

    subset(shown, recipe)
    assert recipe["output"].get("save_adapter", True)  # export, generate and chat need the adapter
    command = _blocks(section, "bash")[0].splitlines()[0].split("#")[0].split()
    assert command[:2] == ["fedllm", "validate"]
    done = subprocess.run([FEDLLM, *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "partition.column = 'topic'" in done.stdout and "ok: recipes/byo_data.yaml" in done.stdout


def test_readme_headline_numbers_come_from_the_studies_json():
    """The headline quotes the convergence study's block once its JSON is committed; until then it
    says the study is running, and its fixed-budget figures are the gradualdiff study's."""
    from fedllm.studies import convergence_report, gradualdiff

    section = _section(README.read_text(), "Headline result")
    conv = ROOT / "docs" / "convergence_study" / "convergence_study.json"
    if conv.is_file():  # its block, rendered from the committed JSON, in the README and on the study's page
        doc = json.loads(conv.read_text())
        assert convergence_report.readme_block(doc, "docs/convergence_study") in section
        page = (ROOT / "docs" / "results" / "convergence.md").read_text()
        assert convergence_report.readme_block(doc, "../convergence_study") in page
    if not conv.is_file() or not convergence_report.full_runs(json.loads(conv.read_text())):
        assert "**running**" in section and "docs/results/convergence.md" in section
    fixed = json.loads((ROOT / "docs" / "gradualdiff_study" / "gradualdiff_study.json").read_text())
    block = gradualdiff.readme_block(fixed)
    prose = re.sub(re.escape(convergence_report.MARK_START) + ".*?" + re.escape(convergence_report.MARK_END), "",
                   section, flags=re.S)  # the fixed-budget sentence, not the convergence block's goals
    quoted = re.findall(r"(\d\.\d\d) × centralized|and (\d\.\d\d) × on natural", prose)
    ratios = {f"{float(x):.2f}" for x in re.findall(r"\| (\d\.\d{3})", block)}
    assert quoted and all(q in ratios for pair in quoted for q in pair if q), (quoted, ratios)


def test_recipe_reference_lists_every_field_validate_explain_prints():
    page = _gen_reference().recipe_page()
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    fields = [line.split(" = ")[0].strip() for line in explain(recipe) if " = " in line.split("#")[0]]
    assert len(fields) > 100
    for name in fields:
        assert f"| `{name}` |" in page, name
    assert "| `lora.r` | int | `8` | LoRA rank |" in page  # type, default and the field's own doc


def test_cli_reference_has_every_command_and_the_exit_codes():
    page = _gen_reference().cli_page()
    for command in ("run", "compare", "validate", "report", "export", "generate", "chat", "edge"):
        assert f"## fedllm {command}\n" in page and f"usage: fedllm {command}" in page
    assert "## Exit codes" in page and "- 3: the run stopped itself" in page


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]' (make setup installs it)")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    recipe = (site / "reference" / "recipe" / "index.html").read_text()
    assert "federation.rounds" in recipe and "LoRA rank" in recipe
    assert "usage: fedllm run" in (site / "reference" / "cli" / "index.html").read_text()
    for study in ("gradualdiff_study/gradualdiff_study", "robustness_study/robustness_study", "deploy"):
        assert (site / study / "index.html").is_file(), study
    # a study block's root-relative image link is made relative to its page
    assert 'src="../../signal_study/signal_study.png"' in (site / "results" / "signal" / "index.html").read_text()
    assert not (site / "gen_reference.py").exists()
    shutil.rmtree(site)
