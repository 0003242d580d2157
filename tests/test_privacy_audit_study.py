"""The privacy audit study's machinery (fedllm.studies.privacy_audit): the plan, two quick parts
recorded and rendered (table, ROC plot, the docs page's block), and a report-only rerun that reads
the recorded parts without running anything."""

from __future__ import annotations

import json
import shutil

from fedllm.studies.privacy_audit import main


def test_plan_lists_every_part_and_its_cost(capsys):
    assert main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert "total: 8 parts" in out and "CPU hours" in out and "secagg_client1" in out


def test_quick_parts_are_recorded_and_rendered(tmp_path):
    page = tmp_path / "privacy_audit.md"
    page.write_text("intro\n<!-- privacy-audit-study -->\nold\n<!-- /privacy-audit-study -->\nend\n")
    out, runs = tmp_path / "out", tmp_path / "runs"
    args = ["--quick", "--only", "server1", "--out", str(out), "--runs", str(runs), "--readme", str(page)]
    assert main(args) == 0
    doc = json.loads((out / "privacy_audit_study.json").read_text())
    assert set(doc["records"]) == {"nodp", "server1"} and doc["clip"] > 0
    bound = doc["records"]["server1"]["audit"]["bounds"]["final"]
    assert bound["epsilon"] <= bound["claimed_epsilon"] < float("inf")
    text = page.read_text()
    assert "| server DP σ=1 | 32 client |" in text and "old" not in text and text.endswith("end\n")
    assert (out / "privacy_audit_study.png").stat().st_size > 0
    assert "How tight the audit is" in (out / "privacy_audit_study.md").read_text()
    # report-only: the recorded parts, nothing run (the run directories are gone)
    shutil.rmtree(runs)
    assert main([*args, "--report-only"]) == 0
    assert set(json.loads((out / "privacy_audit_study.json").read_text())["records"]) == {"nodp", "server1"}
