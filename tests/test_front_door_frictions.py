"""The first user's frictions (issue 35, part 4): client names from the partition column in every
file, table and plot; a client count that does not match the column refused; recipe paths read
from the recipe's folder; unfinished runs refused by export; --version; lock files removed; the run
directory printed; validate's usage line; a missing prompt column named; comparison decimals."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from fedllm.cli import EXIT_BAD_INPUT, main
from fedllm.config import PartitionConfig, RecipeError, dump_recipe, load_recipe
from fedllm.data.partition import client_names, partition

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
CLINICS = ("north", "harbour", "hill")


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _one_line(err: str, *parts: str) -> None:
    assert err.startswith("fedllm: error: ") and err.count("\n") == 1, repr(err)
    for part in parts:
        assert part in err, (part, err)


def _clinics_csv(path: Path, per_clinic: dict[str, int]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["question", "answer", "clinic"])
        writer.writeheader()
        for clinic, n in per_clinic.items():
            for i in range(n):
                writer.writerow({"question": f"When does the {clinic} clinic open on day {i}?",
                                 "answer": f"The {clinic} clinic opens at {8 + i % 3} am.", "clinic": clinic})
    return path


def _clinic_overrides(data: Path, *extra: str) -> list[str]:
    return ["data.builtin=null", f"data.path={data}", "data.prompt_field=question", "data.response_field=answer",
            "data.max_examples=null", "data.eval_size=4", "partition.column=clinic", "partition.num_clients=3",
            "partition.merge_values=false", *extra]


# ----------------------------------------------------------------------------- client names


def test_client_names_reach_partition_metrics_report_and_plot(tmp_path):
    # Prepare: a CSV of three clinics (different sizes, so the id order is not the name order)
    data = _clinics_csv(tmp_path / "clinics.csv", {"north": 10, "harbour": 8, "hill": 6})
    out = tmp_path / "runs"
    # Execute: a local run (each clinic alone: per-client rows), then `fedllm report`
    code, printed, err = _cli(["run", str(TINY), "--mode", "local", "--out", str(out), *_clinic_overrides(
        data, "federation.rounds=2", "train.local_steps=1", "eval.bleu_samples=0", "name=clinics")])
    assert code == 0, err
    run = out / "clinics" / "local"
    assert f"run directory: {run}" in printed.splitlines()  # `fedllm run` says where the run went
    assert not (out / "clinics" / ".local.lock").exists()  # the lock file went with the lock
    code, _, err = _cli(["report", str(run)])
    assert code == 0, err
    # Assert: partition.json names every client id; the ids stay the keys
    part = json.loads((run / "partition.json").read_text())
    names = part["client_names"]
    assert sorted(names) == sorted(CLINICS) and sorted(part["clients"]) == ["0", "1", "2"]
    rows = [r for r in csv.DictReader(data.open(encoding="utf-8"))]
    for k, name in enumerate(names):  # client k holds exactly that clinic's rows
        assert {rows[i]["clinic"] for i in part["clients"][str(k)]} == {name}
    # metrics.jsonl: each per-client entry carries its name beside its numbers
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {k: c["name"] for k, c in last["per_client"].items()} == {str(k): n for k, n in enumerate(names)}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["adapter_client_name"] == names[summary["adapter_client"]]
    # report.md: the clients line and the per-client table
    report = (run / "report.md").read_text()
    assert "Clients (partition.json): " + ", ".join(f"{k} = {n}" for k, n in enumerate(names)) in report
    for k, name in enumerate(names):
        assert f"| {k} | {name} | " in report
    # the plot: the legend names the clients (the mean line's label and the band over clients)
    import fedllm

    result = fedllm.load_run(run)
    assert result.client_names == names
    fig = result.figure()
    legend = " ".join(t.get_text() for ax in fig.axes for lg in [ax.get_legend()] if lg for t in lg.get_texts())
    legend += " ".join(t.get_text() for lg in fig.legends for t in lg.get_texts())
    assert f"range over clients ({', '.join(names)})" in legend, legend
    assert f"3 clients' own models: {', '.join(names)}" in legend, legend


def test_names_join_merged_values_and_other_methods_have_none():
    labels = ["north"] * 5 + ["harbour"] * 3 + ["hill"] * 2 + ["bay"] * 2
    merged = PartitionConfig(method="natural", column="clinic", num_clients=2, merge_values=True)
    # the largest groups first, each to the emptiest client: north, harbour, then bay and hill (ties by name)
    assert client_names(labels, merged) == ["north+hill", "harbour+bay"]
    assert [len(p) for p in partition(12, labels, merged, 0)] == [7, 5]
    assert client_names(labels, PartitionConfig(method="dirichlet", column="clinic", num_clients=2)) is None
    from fedllm.metrics.labels import listed  # a legend stays short however long the merged names are

    assert listed(["a" * 40 + "+b", "c" * 40, "d"]) == f"{'a' * 40}+b and 2 more"


@pytest.mark.parametrize("clients", [3, 5])
def test_a_client_count_other_than_the_column_values_is_refused(clients):
    labels = ["north", "harbour", "hill", "bay"] * 3
    cfg = PartitionConfig(method="natural", column="clinic", num_clients=clients)
    with pytest.raises(RecipeError) as info:
        partition(12, labels, cfg, 0)
    message = str(info.value)
    assert message.startswith("partition.num_clients: ") and "\n" not in message
    for part in (f"{clients} clients", "partition.column 'clinic'", "4 distinct values", "bay, harbour, hill, north"):
        assert part in message, message
    if clients < 4:
        assert "merge_values: true" in message  # the explicit way to merge


def test_validate_names_the_count_and_a_missing_prompt_column(tmp_path):
    data = _clinics_csv(tmp_path / "clinics.csv", {"north": 5, "harbour": 5, "hill": 5, "bay": 5})
    code, _, err = _cli(["validate", str(TINY), *_clinic_overrides(data)])
    assert code == EXIT_BAD_INPUT
    _one_line(err, "partition.num_clients: 3 clients", "'clinic' has 4 distinct values")
    code, printed, err = _cli(["validate", str(TINY), *_clinic_overrides(data, "partition.num_clients=4")])
    assert code == 0, err
    clients = printed.splitlines()[1]  # which clinic is which client id, and its training rows
    assert clients.startswith("clients: 0 = ") and all(f" = {c} (" in clients for c in ("north", "bay")), clients
    code, _, err = _cli(["validate", str(TINY), *_clinic_overrides(data, "partition.num_clients=4",
                                                                  "data.prompt_field=prompt")])
    assert code == EXIT_BAD_INPUT
    _one_line(err, f"data.prompt_field: column 'prompt' not found in {data} (columns: answer, clinic, question)")
    no_response = tmp_path / "prompts.csv"
    no_response.write_text("prompt\nq1\nq2\nq3\n", encoding="utf-8")  # was: "line 2: field 'response': expected ..."
    code, _, err = _cli(["validate", str(TINY), "data.builtin=null", f"data.path={no_response}", "data.eval_size=1",
                         "partition.method=iid", "partition.column=null"])
    _one_line(err, f"data.response_field: column 'response' not found in {no_response} (columns: prompt)")


# ----------------------------------------------------------------------------- paths in recipes


def _recipe_beside_data(tmp_path: Path) -> Path:
    folder = tmp_path / "project" / "recipes"
    (folder / "data").mkdir(parents=True)
    _clinics_csv(folder / "data" / "clinics.csv", {"north": 4, "harbour": 4, "hill": 4})
    values = yaml.safe_load(TINY.read_text())
    values["data"] = {"path": "data/clinics.csv", "prompt_field": "question", "response_field": "answer",
                      "eval_size": 3}
    values["partition"] = {"method": "natural", "column": "clinic", "num_clients": 3}
    recipe = folder / "clinics.yaml"
    recipe.write_text(yaml.safe_dump(values), encoding="utf-8")
    return recipe


def test_recipe_paths_are_read_from_the_recipe_folder_and_overrides_from_the_working_directory(
        tmp_path, monkeypatch):
    recipe_file = _recipe_beside_data(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # the recipe's own relative path: from its folder, whatever the working directory
    recipe = load_recipe(recipe_file)
    assert recipe.data.path == str(recipe_file.parent / "data" / "clinics.csv")
    # the resolved recipe (a run's config.yaml) names the same file from anywhere
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_recipe(recipe), encoding="utf-8")
    assert load_recipe(saved).data.path == recipe.data.path
    # an override: from the working directory
    _clinics_csv(elsewhere / "mine.csv", {"a": 3, "b": 3, "c": 3})
    assert load_recipe(recipe_file, ["data.path=mine.csv"]).data.path == str(elsewhere / "mine.csv")
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file, ["data.path=gone.csv"])
    assert str(info.value) == (f"data.path: data file 'gone.csv' not found at {elsewhere / 'gone.csv'} (a path "
                               f"given on the command line is read from the working directory, {elsewhere})")


def test_a_missing_recipe_path_names_the_absolute_path_tried(tmp_path, monkeypatch):
    recipe_file = _recipe_beside_data(tmp_path)
    (recipe_file.parent / "data" / "clinics.csv").rename(tmp_path / "project" / "clinics.csv")
    values = yaml.safe_load(recipe_file.read_text())
    values["data"]["path"] = "clinics.csv"  # written for `fedllm run` started in project/
    recipe_file.write_text(yaml.safe_dump(values), encoding="utf-8")
    monkeypatch.chdir(tmp_path / "project")
    code, _, err = _cli(["validate", str(recipe_file)])
    assert code == EXIT_BAD_INPUT
    _one_line(err, f"data.path: data file 'clinics.csv' not found at {recipe_file.parent / 'clinics.csv'}",
              f"read from the recipe's folder, {recipe_file.parent}", "write '../clinics.csv'")


def test_the_shipped_byo_recipe_validates_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, printed, err = _cli(["validate", "--recipe-only", str(ROOT / "recipes" / "byo_data.yaml")])
    assert code == 0, err
    assert load_recipe(ROOT / "recipes" / "byo_data.yaml").data.path == str(ROOT / "data" / "helpdesk.jsonl")


# ----------------------------------------------------------------------------- export, CLI, locks


def _lm_run_dir(tmp_path: Path, mode: str) -> Path:
    run = tmp_path / "tiny" / mode
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_recipe(load_recipe(TINY)), encoding="utf-8")
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    return run


def test_export_of_an_unfinished_run_is_refused_with_how_to_finish_it(tmp_path):
    run = _lm_run_dir(tmp_path, "federated")  # killed: adapter of an earlier attempt, no summary.json
    code, printed, err = _cli(["export", str(run), "--out", str(tmp_path / "x")])
    assert code == EXIT_BAD_INPUT and printed == ""
    _one_line(err, f"{run}: is unfinished (no summary.json); `fedllm run RECIPE --resume --out {tmp_path}` it")
    local = _lm_run_dir(tmp_path, "local")
    code, _, err = _cli(["export", str(local), "--out", str(tmp_path / "x")])
    _one_line(err, "is unfinished (no summary.json)", "--mode local", "only federated runs resume")
    # a finished run that saved no adapter keeps its own message
    (local / "summary.json").write_text("{}", encoding="utf-8")
    (local / "adapter" / "adapter_config.json").unlink()
    code, _, err = _cli(["export", str(local), "--out", str(tmp_path / "x")])
    assert code == EXIT_BAD_INPUT
    _one_line(err, "no adapter_config.json", "output.save_adapter: true")


def test_version_and_validate_without_a_recipe(capsys):
    import fedllm

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"fedllm {fedllm.__version__}\n"
    code, _, err = _cli(["validate"])
    assert code == EXIT_BAD_INPUT
    _one_line(err, "fedllm validate: a recipe path is required (usage: fedllm validate ", "recipe [overrides ...])")
    assert "overrides" not in err.split("usage")[0]


def test_lock_files_are_removed_on_release_and_on_an_error_exit(tmp_path):
    from fedllm.federation.rundir import RunLock
    from fedllm.lockfile import LockFile

    first = LockFile(tmp_path / ".a.lock")
    assert first.acquire(wait=False) and (tmp_path / ".a.lock").exists()
    assert not LockFile(tmp_path / ".a.lock").acquire(wait=False)  # held
    first.release()
    assert not (tmp_path / ".a.lock").exists()
    # a process that takes a run's lock and dies of an exception leaves no lock file
    script = ("import sys; from pathlib import Path; from fedllm.federation.rundir import RunLock\n"
              f"lock = RunLock(Path({str(tmp_path / 'tiny' / 'federated')!r}))\n"
              "raise RuntimeError('boom')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 1 and "boom" in done.stderr
    assert not (tmp_path / "tiny" / ".federated.lock").exists()
    RunLock(tmp_path / "tiny" / "federated").release()
    assert list((tmp_path / "tiny").iterdir()) == []


# ----------------------------------------------------------------------------- comparison decimals


def _mode_run(root: Path, mode: str, perplexity: float) -> None:
    import math

    run = root / mode
    run.mkdir(parents=True)
    base = {"mode": mode, "train_loss": None, "bleu": None, "round_time_s": 0.0, "train_time_s": 0.0,
            "aggregate_time_s": 0.0, "eval_time_s": 0.0, "bytes_up": 0, "bytes_down": 0, "clients": []}
    rows = [{**base, "round": 0, "eval_loss": 3.0, "perplexity": math.exp(3.0)},
            {**base, "round": 1, "eval_loss": math.log(perplexity), "perplexity": perplexity}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_comparison_prints_different_perplexities_differently(tmp_path):
    from fedllm.metrics.labels import column_digits
    from fedllm.metrics.report import write_comparison

    _mode_run(tmp_path, "federated", 10.7712)  # both 10.77 at 4 significant digits
    _mode_run(tmp_path, "centralized", 10.7738)
    write_comparison(tmp_path, ["federated", "centralized"], plots=False)
    table = (tmp_path / "comparison.md").read_text()
    assert "| 10.771 |" in table and "| 10.774 |" in table, table
    assert column_digits([10.7712, 10.7738, None, 3]) == 5 and column_digits([1.5, 2.5]) == 4
    assert column_digits([1.0 + 1e-15, 1.0]) == 12  # bounded
