"""The privacy audit end to end on the tiny model: `fedllm run` with canaries, `fedllm audit`.

Two short federated runs through the real CLI: no DP with record canaries made easy to memorize
(few examples, many steps, a high rate), whose uploads must show leakage (the AUC's interval
above 0.5); and server-side DP with canary clients, whose audited lower bound on ε must stay below
the accountant's. A run whose claimed ε is made smaller than the truth is flagged (exit 3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.config import RecipeError, dump_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny.yaml")
FAST = ["eval.bleu_samples=0", "checkpoint.enabled=false", "output.save_adapter=false", "output.plots=false",
        "data.eval_size=4", "partition.method=iid", "lora.dropout=0", "train.batch_size=8", "model.quantization=none",
        "train.head_positions=labeled", "data.max_length=64", "eval.batch_size=16"]
MEMORIZE = ["name=nodp", "data.max_examples=12", "privacy.audit.canaries=32", "privacy.audit.secret_digits=8",
            "federation.rounds=1", "partition.num_clients=2", "train.local_steps=25", "train.lr=0.01", "lora.r=8"]
DP = ["name=dp", "data.max_examples=16", "privacy.audit.canaries=200", "federation.rounds=2", "partition.num_clients=3",
      "train.local_steps=2", "privacy.dp=server", "privacy.noise_multiplier=1.0", "privacy.clip=0.05"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("audit_runs")
    for overrides in (MEMORIZE, DP):
        assert main(["run", TINY, "--out", str(out), *FAST, *overrides]) == 0
    return out


def _audit(path: Path) -> dict:
    return json.loads((path / "audit" / "audit.json").read_text())


def test_no_dp_uploads_leak_measurably(runs):
    path = runs / "nodp" / "federated"
    audit = _audit(path)
    upload = audit["views"]["upload"]["loss"]
    assert upload["auc_lo"] > 0.5, upload  # the interval excludes chance
    assert audit["bounds"]["upload"]["claimed_epsilon"] is None and not audit["violation"]  # no DP: no claim (∞)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["audit"]["violation"] is False
    assert [r["round"] for r in audit["rounds"]] == [1] and set(audit["rounds"][0]["clients"]) == {"0", "1"}


def test_secrets_are_in_the_canaries_file_only(runs):
    path = runs / "nodp" / "federated"
    plan = json.loads((path / "audit" / "canaries.json").read_text())
    secrets = [r["secret"] for r in plan["records"]]
    assert len(secrets) == 32 and sum(plan["members"]) == json.loads((path / "summary.json").read_text())["data"]["canary_members"]
    for f in path.rglob("*"):
        if f.is_file() and f.name != "canaries.json" and f.suffix in (".json", ".jsonl", ".md", ".yaml"):
            text = f.read_text()
            assert not any(s in text for s in secrets), f


def test_dp_bound_stays_below_the_accountant(runs):
    audit = _audit(runs / "dp" / "federated")
    final = audit["bounds"]["final"]
    assert audit["unit"] == "client" and "upload" not in audit["views"]
    assert 0 < final["epsilon"] <= final["claimed_epsilon"] < float("inf")
    assert audit["views"]["final"]["dot"]["auc_lo"] > 0.5  # canary clients are seen through σ = 1


def test_audit_command_prints_the_table(runs, capsys):
    assert main(["audit", str(runs / "dp" / "federated")]) == 0
    out = capsys.readouterr().out
    assert "epsilon lower bound (final" in out and "AUC of each released global model" in out


def test_audit_command_on_a_run_without_canaries_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text(dump_recipe(load_recipe(TINY)))
    assert main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no privacy audit" in err


def test_a_claim_below_the_measured_bound_is_a_loud_error(runs, tmp_path, capsys, caplog):
    # Prepare: the same run, its accountant made to claim a far smaller epsilon than it spent
    path = tmp_path / "dp"
    shutil.copytree(runs / "dp" / "federated", path)
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    rows[-1]["epsilon"] = 0.01
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Execute / Assert
    assert main(["audit", str(path)]) == 3
    assert "VIOLATION" in capsys.readouterr().out
    assert any("PRIVACY AUDIT VIOLATION" in r.getMessage() for r in caplog.records)
    assert _audit(path)["violation"] is True


@pytest.mark.parametrize(("overrides", "field"), [
    (["privacy.audit.canaries=1"], "privacy.audit.canaries"),
    (["privacy.audit.canaries=10", "privacy.audit.clients=[7]"], "privacy.audit.clients"),
    (["privacy.audit.canaries=10", "privacy.audit.kind=client", "robust.aggregator=median"], "privacy.audit.kind"),
    (["privacy.audit.canaries=10", "model.preset=cnn", "data.builtin=fashion_mnist"], "privacy.audit.kind"),
])
def test_audit_recipe_errors_name_the_field(overrides, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides)
    assert err.value.where == field
