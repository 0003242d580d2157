"""``python -m fedllm.studies.convergence --quick``: pilots, server-rate pilots and full runs on the
tiny model, resumable by part, with its tables and plots rendered from the JSON; ``--plan``."""

from __future__ import annotations

import json
import re

from fedllm.studies import convergence, convergence_report


def test_the_plan_lists_every_phase_and_its_cost(capsys, tmp_path):
    assert convergence.main(["--plan", "--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "pilots: 32 parts" in out and "server-rate pilots: 8 parts" in out and "full runs" in out
    assert "; 0 done" in out and "  done\n" not in out and "lr chosen rounds" in out  # nothing recorded yet
    assert "CPU hours" in out and "lr 1e-05" in out and "fedadam@0.01" in out
    assert "edge pilots per end of the grid" in out  # no client rate settled yet: edge pilots may come
    assert [convergence_report.rate_text(x) for x in (3e-5, 1e-4, 0.01, 0.1, 1)] == ["3e-5", "1e-4", "1e-2", "0.1", "1"]
    s = convergence.Settings()
    assert set(convergence.PAPER_LRS) <= set(s.lrs) and max(s.lrs) > 1e-4  # the paper's grid and larger
    full = convergence.full_parts(s, {convergence.choice_key("iid", "federated", "gradualdiff", 1.0):
                                      {"lr": 1e-4, "variant": "gradualdiff"}})
    assert {(p.partition, p.seed) for p in full} == {("iid", 0), ("iid", 1), ("natural", 0), ("natural", 1)}
    short = convergence.Settings(pilot_epochs=0.25)  # a pilot shorter than a round's work: one round of it
    pilot = convergence.Part("pilot", "iid", 0, "centralized", "-", 1.0, 1e-4)
    assert convergence.rounds_of(pilot, short) == 1 and "train.local_epochs=0.25" in convergence.part_overrides(pilot, short)
    quarter = convergence.Part("pilot", "iid", 0, "federated", "gradualdiff", 0.25, 1e-4)
    assert convergence.rounds_of(quarter, convergence.Settings(pilot_epochs=1.0)) == 4
    assert convergence.rounds_of(convergence.Part("full", "iid", 0, "federated", "gradualdiff", 0.25, 1e-4), s) == 40


def test_a_best_rate_at_the_end_of_the_grid_gets_a_pilot_past_it():
    assert [convergence.ladder_step(x, up=True) for x in (1e-4, 2e-4, 3e-4, 1e-3)] == [3e-4, 3e-4, 1e-3, 3e-3]
    assert [convergence.ladder_step(x, up=False) for x in (3e-5, 1e-5, 5e-5)] == [1e-5, 3e-6, 3e-5]
    s = convergence.Settings(lrs=(1e-4, 3e-4, 1e-3), works=(1.0,), extend=2)
    grid = [p for p in convergence.pilot_parts(s) if p.mode != "local"]

    def recorded(parts, **val):  # the recorded pilots of ``parts`` ("cen0.001": best validation loss)
        return {p.key: {"summary": {"best": {"val_loss": val[k]}}} for p in parts if (k := f"{p.mode[:3]}{p.lr:g}") in val}

    def asked(parts, **val):
        return [(p.mode, p.lr) for p in convergence.edge_parts(s, recorded(parts, **val), parts)]

    val = {"cen0.0001": 3.0, "cen0.0003": 2.5, "cen0.001": 2.4, "fed0.0001": 3.0, "fed0.0003": 2.9, "fed0.001": 3.1}
    assert asked(grid, **val) == [("centralized", 3e-3)]  # centralized's best is the top: one step up
    up1 = grid + [convergence.Part("pilot", "iid", 0, "centralized", "-", 1.0, 3e-3)]
    assert asked(up1, **val) == []  # its edge pilot is not recorded yet: nothing more
    assert asked(up1, **val, **{"cen0.003": 2.6}) == []  # worse past the edge: 1e-3 is interior now
    assert asked(up1, **val, **{"cen0.003": 2.3}) == [("centralized", 1e-2)]  # better again: a second step
    up2 = up1 + [convergence.Part("pilot", "iid", 0, "centralized", "-", 1.0, 1e-2)]
    assert asked(up2, **val, **{"cen0.003": 2.3, "cen0.01": 2.2}) == []  # --extend 2 steps, no more
    low = {**val, "fed0.0001": 2.0}
    assert asked(grid, **low) == [("centralized", 3e-3), ("federated", 3e-5)]  # the bottom end too
    s = convergence.Settings(lrs=s.lrs, works=(1.0,), extend=0)
    assert asked(grid, **low) == []


def test_a_state_already_scored_is_answered_from_memory():
    import torch

    calls = []

    class Exp:
        def evaluate(self, state):
            calls.append(1)
            return {"loss": float(sum(t.sum() for t in state.values()))}

    Exp.recipe = type("R", (), {"eval": "e", "data": "d"})()
    exp = convergence.remember_evaluations(Exp())
    a, b = {"w": torch.zeros(3)}, {"w": torch.tensor([0.0, 0.0, 1e-30])}
    first = exp.evaluate(a)
    first["loss"] = 99.0  # a caller changing its copy does not change the memory
    assert exp.evaluate({"w": torch.zeros(3)}) == {"loss": 0.0} and len(calls) == 1
    assert exp.evaluate(b)["loss"] > 0 and len(calls) == 2  # any other bits: scored afresh


def test_full_federated_best_runs_only_the_recipe_whose_pilot_validated_best():
    key = convergence.choice_key
    chosen = {key("iid", "centralized", "-", 1.0): {"lr": 3e-4, "variant": "-", "val_loss": 2.0},
              key("iid", "federated", "gradualdiff", 0.25): {"lr": 1e-3, "variant": "gradualdiff", "val_loss": 2.5},
              key("iid", "federated", "fedadam", 1.0): {"lr": 1e-4, "variant": "fedadam@0.01", "val_loss": 2.4},
              key("iid", "federated", "gradualdiff", 1.0): {"lr": 3e-4, "variant": "gradualdiff", "val_loss": 2.6}}
    every = convergence.full_parts(convergence.Settings(partitions=("iid",), seeds=(0,)), chosen)
    assert sorted((p.variant, p.work) for p in every if p.mode == "federated") == [
        ("fedadam@0.01", 1.0), ("gradualdiff", 0.25), ("gradualdiff", 1.0)]
    best = convergence.full_parts(convergence.Settings(partitions=("iid", "natural"), seeds=(0, 1),
                                                       full_federated="best"), chosen)
    fed = [(p.partition, p.seed, p.variant, p.work, p.lr) for p in best if p.mode == "federated"]
    assert fed == [(part, seed, "fedadam@0.01", 1.0, 1e-4) for part in ("iid", "natural") for seed in (0, 1)]
    assert sum(p.mode == "centralized" for p in best) == 4
    assert [p.mode for p in best[:2]] == ["centralized", "federated"]  # a ratio after each pair


def test_a_partial_study_says_how_many_full_runs_are_in():
    part = {"phase": "full", "partition": "iid", "seed": 0, "mode": "centralized", "variant": "-", "work": 1.0, "lr": 3e-3}
    rows = [{"round": 0, "epochs": 0.0, "eval_loss": 2.0, "val_loss": 2.1}]
    doc = {"records": {"c": {"part": part, "rows": rows, "summary": {"best": {"round": 0, "val_loss": 2.1}},
                             "bleu": None}}, "full_planned": 3}
    block = convergence_report.readme_block(doc)
    assert "**running**: 1 of its 3 full runs recorded" in block
    assert "best federated recipe (no full run yet)" in block  # a goal without its runs says so, not "None"
    assert convergence_report.progress_line({**doc, "full_planned": 1}) == []  # all in: no such line


def test_quick_study_chooses_rates_runs_to_its_best_and_resumes(tmp_path, capsys):
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = ["--quick", "--out", str(out), "--runs", str(runs)]
    assert convergence.main(args) == 0
    doc = json.loads((out / "convergence_study.json").read_text())
    chosen = doc["chosen"]
    assert {k.split("|")[1] for k in chosen} == {"centralized", "local", "federated"}
    pilots = [r["part"] for r in doc["records"].values() if r["part"]["phase"] == "pilot"]
    rows = {k: [p["lr"] for p in pilots if f"{p['partition']}|{p['mode']}|{p['variant']}|{p['work']:g}" == k]
            for k in chosen if "@" not in chosen[k]["variant"]}
    assert any(max(row) == 3e-2 for row in rows.values())  # the tiny model's best is the grid's top: extended
    for k, row in rows.items():  # a chosen rate at the end of what was tried: its one edge pilot (--extend 1) ran
        assert chosen[k]["lr"] < max(row) or sum(x > 1e-2 for x in row) == 1
    assert chosen["iid|federated|fedadam|1"]["variant"] == "fedadam@0.01"
    full = {k: r for k, r in doc["records"].items() if r["part"]["phase"] == "full"}
    assert {r["part"]["mode"] for r in full.values()} == {"centralized", "local", "federated"}
    for rec in full.values():  # every full run at its mode's chosen rate, with a best round
        part = rec["part"]
        family = part["variant"].split("@")[0]
        assert part["lr"] == chosen[f"iid|{part['mode']}|{family}|1"]["lr"]
        assert rec["summary"]["best"]["val_loss"] is not None and "eval_nll" not in rec  # slim JSON
        assert rec["rows"][-1]["epochs"] <= 2.0
        assert rec["bleu"]["samples"] == 2 and rec["bleu"]["best"] is not None  # scored on the saved adapters
        assert (rec["bleu"]["last"] is None) == (part["mode"] == "local")
        assert all(r.get("bleu") is None for r in rec["rows"])  # not every round
        if part["mode"] == "federated":  # a client's round: the round's training over the clients it ran
            assert all(len(r["clients"]) == 3 for r in rec["rows"][1:])
            assert 0 < convergence_report.client_round_seconds(rec, "federated") <= convergence_report.round_seconds(rec) / 3
    pair = doc["ratios"]["iid"]
    top = pair["best_federated"]
    r = pair["fed_over_central"][top]["0"]["best"]
    assert r["lo"] < r["ratio"] < r["hi"]
    said = convergence_report.agreement(doc["ratios"])
    assert said[0].startswith(f"- iid: {top} / centralized perplexity at best validation {r['ratio']:.3f}")
    md = (out / "convergence_study.md").read_text()
    assert said[0] in md
    assert convergence_report.headline_table(doc) in md and "| iid | centralized |" in md
    assert "## Pilots" in md and (out / "loss_iid.png").stat().st_size > 0 and (out / "ratio_iid.png").is_file()
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts_quick").iterdir()}
    assert convergence.main(args) == 0  # resumable by part: everything recorded, nothing runs again
    assert {p.name: p.stat().st_mtime_ns for p in (out / "parts_quick").iterdir()} == before
    assert "best val_loss" not in capsys.readouterr().out
    assert convergence.main([*args, "--plan"]) == 0  # the plan knows what is done, and at which rates
    plan = capsys.readouterr().out
    assert plan.count("  done\n") == len(before) and "<= 0.0 CPU hours left" in plan and "chosen" not in plan
    assert "edge pilots per end" not in plan  # every client rate settled
    full_lrs = {r["part"]["lr"] for r in full.values()}
    assert all(f"lr {lr:g} rounds" in plan for lr in full_lrs)
    cut = {k for k, r in full.items() if convergence.cut_by_cap(r)}  # ended at the cap, no early stop
    assert cut and all(full[k]["part"]["mode"] != "local" for k in cut)
    assert convergence.main([*args, "--plan", "--continue-to", "3"]) == 0  # the continuations are not done yet
    plan = capsys.readouterr().out
    assert plan.count("(continued: the cap cut it off)\n") == len(cut)
    assert plan.count("  done\n") == len(before) - len(cut)
    assert convergence.main([*args, "--continue-to", "3"]) == 0  # they go on from their checkpoints, nothing else runs
    after = json.loads((out / "convergence_study.json").read_text())["records"]
    for k, rec in full.items():
        if k not in cut:
            assert after[k] == rec
            continue
        grown = after[k]
        assert grown["part"]["cap"] == 3 and len(grown["rows"]) > len(rec["rows"])
        assert grown["rows"][:len(rec["rows"])] == rec["rows"]  # resumed: the rounds at the cap are the same rows
        assert grown["rows"][-1]["epochs"] <= 3.0 and grown["bleu"]["samples"] == 2  # BLEU of the continued run
        assert convergence_report.ended_by(grown).endswith("(continued)")
    assert convergence.main([*args, "--plan", "--continue-to", "3"]) == 0
    plan = capsys.readouterr().out
    assert plan.count("(continued: the cap cut it off)  done\n") == len(cut) and plan.count("  done\n") == len(before)
    assert convergence.main([*args, "--report-only"]) == 0  # without the flag a continued run is read as it stands
    assert json.loads((out / "convergence_study.json").read_text())["records"] == after
    page, headline = tmp_path / "page.md", tmp_path / "top" / "README.md"
    headline.parent.mkdir()
    for f in (page, headline):
        f.write_text(f"# x\n{convergence_report.MARK_START}\nold\n{convergence_report.MARK_END}\ntail\n")
    assert convergence.main([*args, "--report-only", "--readme", str(page), "--headline", str(headline)]) == 0
    committed = json.loads((out / "convergence_study.json").read_text())
    assert page.read_text() == f"# x\n{convergence_report.readme_block(committed, 'out')}\ntail\n"
    assert headline.read_text() == f"# x\n{convergence_report.readme_block(committed, '../out')}\ntail\n"
    links = re.findall(r"\]\(\.\./out/([^)]+\.png)\)", headline.read_text())  # the plots, relative to the file
    assert set(links) == {"loss_iid.png", "ratio_iid.png"} and all((out / name).is_file() for name in links)


def test_the_table_says_what_ended_each_run():
    def rec(mode, stop=None, best=3, cap=None):
        return {"part": {"mode": mode, "cap": cap}, "summary": {"stopped_early": stop, "best": {"round": best}}}

    assert convergence_report.ended_by(rec("federated")) == "cap"
    assert convergence_report.ended_by(rec("centralized", {"round": 4, "patience": 2})) == "patience"
    assert convergence_report.ended_by(rec("federated", None, 24, cap=6.0)) == "cap (continued)"
    assert convergence_report.ended_by(rec("local", {"clients": [2], "patience": 2}, {"0": 2, "1": 4, "2": 1})) \
        == "patience (clients 2), cap (clients 0, 1)"
    assert convergence_report.ended_by(rec("local", {"clients": [0, 1], "patience": 2}, {"0": 2, "1": 1})) \
        == "patience (every client)"
    assert convergence_report.ended_by(rec("local", None, {"0": 4, "1": 4})) == "cap (every client)"
    assert convergence_report._ended_cell({0: rec("centralized", {"round": 4}), 1: rec("centralized", {"round": 3})}) \
        == "patience"
    assert convergence_report._ended_cell({0: rec("federated"), 1: rec("federated", {"round": 9})}) \
        == "seed 0: cap; seed 1: patience"
    assert convergence.cut_by_cap({"part": {"phase": "full", "mode": "federated"}, "summary": {"stopped_early": None}})
    assert not convergence.cut_by_cap({"part": {"phase": "full", "mode": "local"}, "summary": {"stopped_early": None}})


def test_the_paper_ratio_is_read_against_every_seed_interval():
    def seeds(*spans):
        return [{"ratio": (lo + hi) / 2, "lo": lo, "hi": hi} for lo, hi in spans]

    paper = 16.78 / 15.36
    assert convergence_report.against_paper(seeds((1.05, 1.12), (1.08, 1.10)), paper).startswith("agrees")
    assert convergence_report.against_paper(seeds((1.20, 1.30), (1.10, 1.15)), paper).startswith("larger")
    assert convergence_report.against_paper(seeds((1.00, 1.05)), paper).startswith("smaller")
    assert convergence_report.against_paper(seeds((1.00, 1.05), (1.05, 1.12)), paper).startswith("mixed")
    assert convergence_report.against_paper([{"ratio": 1.1, "lo": None, "hi": None}], paper).startswith("no interval")


def test_before_its_full_runs_the_block_says_the_study_is_running():
    pilot = {"part": {"phase": "pilot", "partition": "iid", "mode": "centralized"}}
    block = convergence_report.readme_block({"records": {"a": pilot, "b": pilot}}, "docs/convergence_study")
    assert "**running**: 2 parts recorded so far (all pilots)" in block and ".png" not in block
    assert block.startswith(convergence_report.MARK_START) and block.endswith(convergence_report.MARK_END)
