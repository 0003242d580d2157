"""The privacy audit study's table, ROC plot and paragraph, from its recorded parts only.

:func:`write_report` writes ``privacy_audit_study.{json,md,png}`` to the study's folder and, with
``--readme``, replaces the ``<!-- privacy-audit-study -->`` block of docs/results/privacy_audit.md.
The paragraph is computed from the numbers (which defenses lowered the records' AUC and by how much;
how far each audited lower bound is from the accountant's ε), never written by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedllm.studies import replace_block

START, END = "<!-- privacy-audit-study -->", "<!-- /privacy-audit-study -->"


def _eps(x: float | None) -> str:
    return "∞" if x is None or math.isinf(x) else f"{x:.3g}"  # JSON writes ∞ (no claim) as null


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _auc(view: dict[str, Any] | None) -> str:
    if not view:
        return "—"
    return f"{view['auc']:.3f} [{view['auc_lo']:.2f}, {view['auc_hi']:.2f}]"


def main_attack(rec: dict[str, Any], view: str) -> dict[str, Any] | None:
    """The bounded attack's membership numbers for ``view`` (the one the audit's bound used)."""
    audit = rec["audit"]
    if view not in audit["views"]:
        return None
    return audit["views"][view][audit["bounds"][view]["attack"]]


def table(records: dict[str, dict]) -> str:
    lines = ["| configuration | canaries | perplexity | accountant ε (final / uploads) | audited ε ≥ (final / uploads) "
             "| AUC final [95 % CI] | AUC uploads [95 % CI] | TPR @ 1 % FPR (final) | verdict |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for rec in records.values():
        a, c = rec["audit"], rec["config"]
        b = a["bounds"]
        up = b.get("upload")
        final = main_attack(rec, "final")
        verdict = "**VIOLATION**" if a["violation"] else "bound ≤ accountant"
        lines.append(
            f"| {c['label']} | {a['canaries']} {a['unit']} | {rec['rows'][-1]['perplexity']:.2f} | "
            f"{_eps(b['final']['claimed_epsilon'])} / {_eps(up['claimed_epsilon']) if up else '—'} | "
            f"{_eps(b['final']['epsilon'])} / {_eps(up['epsilon']) if up else '—'} | {_auc(final)} | "
            f"{_auc(main_attack(rec, 'upload'))} | {final['tpr_at_1pct_fpr']:.3f} | {verdict} |")
    return "\n".join(lines)


def _leak(rec: dict[str, Any]) -> float:
    """The strongest record leakage the server had: the highest AUC over the views it saw."""
    return max(main_attack(rec, v)["auc"] for v in rec["audit"]["views"])


def paragraph(records: dict[str, dict], clip: float | None) -> str:
    """Which defenses lowered the record canaries' AUC here and by how much; how tight the bounds are."""
    out = []
    base = records.get("nodp")
    if base is not None:
        b = main_attack(base, "upload") or main_attack(base, "final")
        measurable = b["auc_lo"] > 0.5
        out.append(f"Without DP the server's best membership attack on the record canaries reaches AUC {b['auc']:.3f} "
                   f"[{b['auc_lo']:.2f}, {b['auc_hi']:.2f}] ({'measurable leakage: the interval excludes 0.5' if measurable else 'the interval includes 0.5: no leakage measured at this size'}).")
        for name, rec in records.items():
            if name == "nodp" or rec["audit"]["unit"] != "example":
                continue
            change = _leak(rec) - _leak(base)
            out.append(f"{rec['config']['label']}: best AUC {_leak(rec):.3f} ({change:+.3f} against no DP"
                       f"{'; the uploads are hidden, the final model is all the server has' if name == 'secagg' else ''}).")
    tight = [(rec["config"]["label"], rec["audit"]["bounds"]["final"]) for rec in records.values()
             if _finite(rec["audit"]["bounds"]["final"]["claimed_epsilon"])]
    if tight:
        parts = [f"{label}: {_eps(b['epsilon'])} of {_eps(b['claimed_epsilon'])}" for label, b in tight]
        out.append("How tight the audit is (audited lower bound of the released models against the accountant's ε): "
                   + "; ".join(parts) + ". A bound below the accountant's ε is what a correct mechanism gives; the gap "
                   "is the audit's looseness (one run, a few hundred canaries, a Gaussian mechanism audited through a "
                   "pure-ε test) plus whatever the accountant over-states.")
    if any(rec["audit"]["violation"] for rec in records.values()):
        out.append("**A lower bound exceeded the accountant's ε: that is a bug in the mechanism or its accounting.**")
    if clip is not None:
        out.append(f"Clip C = {clip:g}: the norm of the no-DP run's round-1 change of the global adapter "
                   "(data-dependent, not private; stated).")
    return " ".join(out)


def plot(records: dict[str, dict], path: Path) -> None:
    """ROC curves of the final model, record canaries and client canaries side by side."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, unit, title in ((axes[0], "example", "record canaries (final model)"),
                            (axes[1], "client", "client canaries (final model)")):
        for rec in records.values():
            a = rec["audit"]
            if a["unit"] != unit:
                continue
            roc = a["roc_final"]
            ax.plot(roc["fpr"], roc["tpr"], label=f"{rec['config']['label']} (AUC {main_attack(rec, 'final')['auc']:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_xlabel("false positive rate (symlog)")
        ax.set_ylabel("true positive rate")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def readme_block(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    kind = ("**quick form** (tiny random llama, a handful of steps: the machinery, not the finding)"
            if meta["settings"]["quick"] else "SmolLM2-135M NF4 + LoRA, coralmap, 5 iid clients")
    return "\n".join([START, "", f"Produced by `{meta['command']}`: {kind}; {meta['machine']}.", "",
                      table(doc["records"]), "", paragraph(doc["records"], doc.get("clip")), "", END])


def write_report(doc: dict[str, Any], out: Path, readme: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy_audit_study.json").write_text(json.dumps(doc, indent=1, default=lambda v: None), encoding="utf-8")
    records = doc["records"]
    if not records:
        (out / "privacy_audit_study.md").write_text("# Privacy audit study\n\nNo part is recorded yet.\n",
                                                    encoding="utf-8")
        return
    plot(records, out / "privacy_audit_study.png")
    s = doc["meta"]["settings"]
    text = ["# Privacy audit study", "",
            f"Produced by `{doc['meta']['command']}` ({'quick' if s['quick'] else 'full'} settings: {s['rounds']} rounds, "
            f"{s['canaries']} canaries, {s['max_examples']} examples; {doc['meta']['machine']}). Raw numbers: "
            "`privacy_audit_study.json`; per part: `parts/`. How to read each number: "
            "[the privacy audit how-to](../howto/privacy-audit.md).", "", table(records), "",
            "![ROC curves](privacy_audit_study.png)", "", "## Reading it", "", paragraph(records, doc.get("clip")), ""]
    (out / "privacy_audit_study.md").write_text("\n".join(text), encoding="utf-8")
    if readme is not None:
        replace_block(readme, START, END, readme_block(doc))
