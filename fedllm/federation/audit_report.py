"""The privacy audit's numbers, from a run directory's files only (``fedllm audit RUN_DIR``, end of run).

Reads ``audit/canaries.json`` and ``audit/scores.jsonl`` (:mod:`fedllm.federation.audit`), the
recipe (``config.yaml``) and the last ``metrics.jsonl`` row (the accountant's ε), and computes:

- per view and attack, the membership AUC with its 95 % interval and the TPR at 1 % FPR: the
  *uploads* (each client's Δ applied to its start, all rounds; not under secure aggregation), the
  *final* model (every released global model, against the initial one; the per-round sums
  telescope to it), and per round (each released global model) and per client and round;
- the one-run lower bound on ε (Steinke et al., 2023) per view, at ``privacy.delta`` and
  ``privacy.audit.confidence``, over every (view, attack, guess count) tried (Bonferroni), held
  against the accountant's ε for that view (:func:`fedllm.federation.audit.claims`). A bound above
  the claim is a bug in the mechanism or its accounting: ``violation`` is set, the run's status
  says so and the CLI exits 3.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from fedllm.algorithms.audit import attack_scores, auc, auc_interval, audit_bound, roc_curve, tpr_at_fpr
from fedllm.config import RecipeError, load_recipe
from fedllm.federation.audit import AUDIT_DIR, claims
from fedllm.federation.rundir import read_metrics, run_status, write_json_atomic

log = logging.getLogger(__name__)

THREAT = {"example": "example-level: one record of one client (DP-SGD's unit; a client-level epsilon bounds it too)",
          "client": "client-level: a whole client (canary clients whose update is a random direction of norm C, "
                    "Andrew et al. 2024)"}


def read_audit(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(canaries.json, the scores.jsonl records) of a run directory; a RecipeError names what is missing."""
    folder = Path(path) / AUDIT_DIR
    if not (folder / "canaries.json").is_file():
        raise RecipeError(str(path), "no privacy audit in this run (it had no canaries: set privacy.audit.canaries)")
    try:
        plan = json.loads((folder / "canaries.json").read_text(encoding="utf-8"))
        lines = [json.loads(x) for x in (folder / "scores.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, ValueError) as exc:
        raise RecipeError(str(folder), f"could not read the audit files ({exc})") from None
    if not any(r.get("view") == "final" for r in lines):
        raise RecipeError(str(folder), "the audit has no final scores: the run did not finish")
    return plan, lines


def membership(scores: list[float], members: list[bool]) -> dict[str, Any]:
    """AUC (95 % interval) and TPR at 1 % FPR of one attack's scores."""
    value = auc(scores, members)
    lo, hi = auc_interval(value, sum(members), len(members) - sum(members))
    return {"auc": value, "auc_lo": lo, "auc_hi": hi, "tpr_at_1pct_fpr": tpr_at_fpr(scores, members, 0.01),
            "canaries": len(members), "members": sum(members)}


def _final_scores(plan: dict[str, Any], final: dict[str, Any]) -> dict[str, list[float]]:
    if plan["unit"] == "client":
        return {"dot": list(final["dot"])}
    return attack_scores(final["loss"], final["ref"], plan.get("zlib_bits"))


def _upload_scores(lines: list[dict[str, Any]], m: int) -> tuple[list[int], dict[str, list[float]]]:
    """Example canaries over every upload of their client: (canaries seen, scores per attack): the summed
    reference gain Σ (L_start − L_upload) and the loss at the client's last upload."""
    gain: dict[int, float] = {}
    last: dict[int, float] = {}
    for rec in (r for r in lines if r.get("view") == "upload"):
        for j, loss, ref in zip(rec["ids"], rec["loss"], rec["ref"]):
            gain[j] = gain.get(j, 0.0) + ref - loss
            last[j] = loss
    seen = sorted(gain)
    return seen, {"loss": [-last[j] for j in seen], "ref": [gain[j] for j in seen]}


def _per_round(plan: dict[str, Any], lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: the released model's AUC (reference attack, or ⟨Δ, u⟩) and each upload's."""
    members = plan["members"]
    out: dict[int, dict[str, Any]] = {}
    for rec in lines:
        if not isinstance(rec.get("round"), int):
            continue
        row = out.setdefault(rec["round"], {"round": rec["round"], "clients": {}})
        if rec["view"] == "aggregate":
            scores = rec["dot"] if "dot" in rec else [r - x for r, x in zip(rec["ref"], rec["loss"])]
            row["aggregate"] = membership(scores, members)
        elif rec["view"] == "upload":
            mem = [members[j] for j in rec["ids"]]
            row["clients"][str(rec["client"])] = membership([r - x for r, x in zip(rec["ref"], rec["loss"])], mem)
    return [out[r] for r in sorted(out)]


def analyze(path: Path, recipe: Any = None, last_row: dict[str, Any] | None = None) -> dict[str, Any]:
    """The audit of the run in ``path`` (see the module docstring), as written to ``audit/audit.json``."""
    path = Path(path)
    plan, lines = read_audit(path)
    if recipe is None:
        recipe = load_recipe(path / "config.yaml")
    if last_row is None:
        last_row = read_metrics(path)[-1]
    members = [bool(x) for x in plan["members"]]
    final = next(r for r in lines if r.get("view") == "final")
    views: dict[str, tuple[list[bool], dict[str, list[float]]]] = {"final": (members, _final_scores(plan, final))}
    if plan["unit"] == "example" and any(r.get("view") == "upload" for r in lines):
        seen, scores = _upload_scores(lines, len(members))
        views["upload"] = ([members[j] for j in seen], scores)
    bound_attacks = {"loss", "ref", "dot"}  # zlib is shown, not bounded: one test fewer to pay for
    families = sum(len([a for a in sc if a in bound_attacks]) for _, sc in views.values())
    delta, beta = float(plan["delta"]), 1 - float(plan["confidence"])
    claim = claims(recipe, last_row)
    result: dict[str, Any] = {"unit": plan["unit"], "threat_model": THREAT[plan["unit"]], "canaries": len(members),
                              "members": sum(members), "delta": delta, "confidence": plan["confidence"],
                              "secure_aggregation": plan["secure_aggregation"], "views": {}, "bounds": {}}
    for view, (mem, scores) in views.items():
        result["views"][view] = {a: membership(s, mem) for a, s in scores.items()}
        best = None
        for attack in (a for a in scores if a in bound_attacks):
            b = audit_bound(scores[attack], mem, delta, beta, families)
            if best is None or b.epsilon > best[1].epsilon:
                best = (attack, b)
        result["bounds"][view] = {"attack": best[0], **best[1].as_dict(), "claimed_epsilon": claim[view],
                                  "violation": best[1].epsilon > claim[view] + 1e-9}
    main_attack = "dot" if plan["unit"] == "client" else "ref"
    fpr, tpr = roc_curve(views["final"][1][main_attack], members)
    result["roc_final"] = {"attack": main_attack, "fpr": fpr, "tpr": tpr}
    result["rounds"] = _per_round(plan, lines)
    result["violation"] = any(b["violation"] for b in result["bounds"].values())
    return result


def _eps(x: float | None) -> str:
    return "inf" if x is None or math.isinf(x) else f"{x:.3g}"  # audit.json writes inf (no claim) as null


def table_lines(result: dict[str, Any], name: str = "") -> list[str]:
    """The audit as plain text (what ``fedllm audit`` prints)."""
    lines = [f"privacy audit{f' of {name}' if name else ''}: {result['canaries']} {result['unit']} canaries "
             f"({result['members']} members), {result['threat_model']}",
             f"{'view':8s} {'attack':6s} {'AUC [95% CI]':22s} {'TPR@1%FPR':>9s}"]
    for view, attacks in result["views"].items():
        for attack, r in attacks.items():
            lines.append(f"{view:8s} {attack:6s} {r['auc']:.3f} [{r['auc_lo']:.3f}, {r['auc_hi']:.3f}]      "
                         f"{r['tpr_at_1pct_fpr']:9.3f}")
    per_round = [f"r{row['round']}: {row['aggregate']['auc']:.2f}" for row in result["rounds"] if "aggregate" in row]
    if per_round:
        lines.append("AUC of each released global model: " + ", ".join(per_round))
    clients = sorted({k for row in result["rounds"] for k in row["clients"]}, key=int)
    for k in clients:
        cells = [f"r{row['round']}: {row['clients'][k]['auc']:.2f}" for row in result["rounds"] if k in row["clients"]]
        lines.append(f"AUC of client {k}'s uploads: " + ", ".join(cells))
    conf = f"{100 * result['confidence']:g} %"
    for view, b in result["bounds"].items():
        verdict = "VIOLATION: above the accountant's epsilon" if b["violation"] else "ok (<= the accountant's)"
        how = (f"from {b['correct']} of {b['guesses']} guesses ({b['attack']})" if b["guesses"]
               else "(no set of guesses beats chance at this confidence)")
        lines.append(f"epsilon lower bound ({view}, {conf} confidence, delta={result['delta']:g}): {_eps(b['epsilon'])} "
                     f"{how}; accountant epsilon {_eps(b['claimed_epsilon'])}: {verdict}")
    return lines


def write_audit(path: Path, recipe: Any = None, last_row: dict[str, Any] | None = None) -> dict[str, Any]:
    """Analyze and write ``audit/audit.json``; a violation is logged as an error."""
    result = analyze(path, recipe, last_row)
    write_json_atomic(Path(path) / AUDIT_DIR / "audit.json", result)
    if result["violation"]:
        for view, b in result["bounds"].items():
            if b["violation"]:
                log.error("PRIVACY AUDIT VIOLATION (%s): the measured lower bound on epsilon, %s, is above the "
                          "accountant's epsilon %s: the mechanism or its accounting is wrong", view,
                          _eps(b["epsilon"]), _eps(b["claimed_epsilon"]))
    return result


def audit_at_end(auditor: Any, state: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """End of a federated run with canaries: final scores, ``audit.json``, and the summary's block
    (``status`` names a violation, so the run exits 3)."""
    if auditor is None:
        return {}
    auditor.finish(state)
    result = write_audit(auditor.dir.parent, auditor.recipe, rows[-1])
    for line in table_lines(result, auditor.recipe.name):
        log.info("%s", line)
    block = {"audit": {"violation": result["violation"],
                       **{f"{v}_epsilon_lower_bound": b["epsilon"] for v, b in result["bounds"].items()},
                       **{f"{v}_auc": result["views"][v][b["attack"]]["auc"] for v, b in result["bounds"].items()}}}
    if result["violation"]:
        status = run_status(rows)["status"]
        why = "privacy audit: the measured lower bound on epsilon is above the accountant's (audit/audit.json)"
        block["status"] = why if status == "ok" else f"{status}; {why}"
    return block


def audit_command(run_dir: str) -> int:
    """``fedllm audit RUN_DIR``: the table for a finished run with canaries (exit 3 on a violation);
    one line and exit 2 for a run without canaries."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise RecipeError(run_dir, "not a run directory (no config.yaml)")
    result = write_audit(path)
    print("\n".join(table_lines(result, str(path))))
    return 3 if result["violation"] else 0
