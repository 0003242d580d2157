"""The robustness study's plumbing on its quick settings: parts run through the engine, are recorded
with their recipe, are not re-run, and render the table, the verdicts and the README block."""

from __future__ import annotations

from fedllm.federation.build import attack
from fedllm.studies import robustness

PARTS = ["mean:clean:0", "mean:ipm20:0", "bulyan:clean:0", "bulyan:ipm20:0", "afa:ipm20:0"]


def test_quick_parts_run_record_and_render(tmp_path):
    out, runs = tmp_path / "doc", tmp_path / "runs"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{robustness.MARK_START}\nold\n{robustness.MARK_END}\ntail\n")
    args = ["--out", str(out), "--runs", str(runs), "--quick", "--seeds", "0", "--readme", str(readme)]
    assert robustness.main([*args, *[a for p in PARTS for a in ("--part", p)]]) == 0
    recorded = sorted(p.name for p in (out / "parts_quick").iterdir())
    assert recorded == sorted(f"{d}_{c}_s0.json" for d, c in (("mean", "clean"), ("mean", "ipm20"),
                                                                ("bulyan", "clean"), ("bulyan", "ipm20"),
                                                                ("afa", "ipm20")))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "parts_quick").iterdir()}
    assert robustness.main([*args, "--part", "mean:clean:0"]) == 0  # recorded for the same recipe: kept
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "parts_quick").iterdir()}
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("tail\n") and "old" not in text
    assert "5 of 56 parts finished" in text
    results = robustness.collect(out, robustness.plan([0]), quick=True)
    ipm = robustness.changes(results, "mean", "ipm20")
    assert len(ipm) == 1 and ipm[0] == ipm[0]  # a number (not NaN)
    assert "| Bulyan |" in text and "IPM at 20 %: best defense" in text
    # Bulyan's rows name whom it excluded every round: K - theta = 2f = 8 of the 20
    rows = results["bulyan"]["ipm20"][0]["rows"]
    assert all(len(r["robust"]["excluded"]) == 8 for r in rows[1:])
    # AFA's cosine filter removes exactly IPM's attackers (they point against the honest mean) every round
    _, bad = attack(robustness.part_recipe("afa", "ipm20", 0, quick=True), 20)
    rows = results["afa"]["ipm20"][0]["rows"]
    assert len(bad) == 4 and all(r["robust"]["excluded"] == sorted(bad) for r in rows[1:])
    assert (out / "robustness_study.png").is_file() and (out / "robustness_study.md").is_file()
