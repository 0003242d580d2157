"""The privacy audit study (issue 36): what a server learns from LoRA deltas, and what each defense changes.

The question the GradualDiff paper left open. SmolLM2-135M NF4 + LoRA on every linear layer
(``recipes/studies/gradualdiff.yaml``), coralmap, 5 iid clients, GradualDiff, ``--rounds`` rounds of
one local epoch each, with ``--canaries`` canaries (:mod:`fedllm.algorithms.audit`) under:

- no DP; secure aggregation (the server sees only the sum); DP-SGD (σ = 1, per-example clip 1):
  *example* canaries, random-secret records in the clients' data;
- client-level DP with the noise on the clients (σ = 1 and σ = 3), server-side DP (σ = 1) and
  secure aggregation with client DP (σ = 1): *client* canaries (random directions of norm C,
  Andrew et al., 2024), the unit client-level DP protects; client DP σ = 1 also with example
  canaries, so that its leakage of records compares with no DP's.

For each: held-out perplexity, the accountant's ε (δ = 1e-5) for the view audited, the one-run lower
bound on ε (Steinke et al., 2023, 95 % confidence), and the membership AUC (95 % interval) and
TPR at 1 % FPR of the final model and of the uploads. The clip C of the DP runs is the norm of the
no-DP run's round-1 change of the global adapter (data-dependent and not private; stated); their
``federation.max_change_ratio`` guard is off (with 5 clients the noise alone moves the adapter by
more than 10x its norm, and the guard would reject every round while the accountant still charges it).

A *part* is one run, recorded in ``<out>/parts/<name>.json`` and skipped when its recipe is
unchanged (an interrupted part resumes from its checkpoint). ``--plan`` prints the parts and a CPU
hour estimate; ``--quick`` runs every part on the tiny model in a few minutes (CI)::

    nice -n 19 python -m fedllm.studies.privacy_audit --out docs/privacy_audit_study \\
        --readme docs/results/privacy_audit.md [--plan] [--quick] [--only nodp,server1] [--report-only]
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedllm.studies import finished_run, machine_line, parts_folder, quiet_process, recorded, study_parser

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "studies" / "gradualdiff.yaml"
QUICK = ["model.preset=tiny", "model.quantization=none", "lora.target_modules=[q_proj,v_proj]", "lora.r=8",
         "lora.dropout=0", "partition.num_clients=2", "data.max_examples=16", "data.eval_size=4",
         "train.batch_size=8", "train.local_epochs=null", "train.local_steps=6", "train.lr=0.02", "eval.batch_size=16"]
# --plan's cost model: docs/benchmarks.md's fp32 rates on 2 shared cores (training 91.6, evaluation
# 337.4 tokens/s), 104 tokens a coralmap example, 45 a canary (system prompt, question, 12 digits),
# DP-SGD's per-example gradients at 3x a step (an assumption, stated in the plan).
TRAIN_TPS, EVAL_TPS, TOKENS_PER_EXAMPLE, TOKENS_PER_CANARY, DPSGD_FACTOR = 91.6, 337.4, 104, 45, 3.0
BF16_SPEEDUP = 2.15  # the lean bf16 client step against the exact one (docs/benchmarks.md, bench_client_throughput --bf16)


@dataclass(frozen=True)
class Config:
    name: str
    label: str
    overrides: tuple[str, ...]
    unit: str  # canaries: example | client
    needs_clip: bool = False


CONFIGS = (
    Config("nodp", "no DP", ("privacy.dp=none",), "example"),
    Config("secagg", "secure aggregation", ("privacy.secure_aggregation=true",), "example"),
    Config("dpsgd", "DP-SGD σ=1", ("privacy.dpsgd=true", "privacy.dpsgd_noise=1.0", "privacy.dpsgd_clip=1.0"),
           "example"),
    Config("client1_records", "client DP σ=1 (record canaries)",
           ("privacy.dp=client", "privacy.noise_multiplier=1.0", "privacy.audit.kind=example"), "example", True),
    Config("client1", "client DP σ=1", ("privacy.dp=client", "privacy.noise_multiplier=1.0"), "client", True),
    Config("client3", "client DP σ=3", ("privacy.dp=client", "privacy.noise_multiplier=3.0"), "client", True),
    Config("server1", "server DP σ=1", ("privacy.dp=server", "privacy.noise_multiplier=1.0"), "client", True),
    Config("secagg_client1", "secure aggregation + client DP σ=1",
           ("privacy.dp=client", "privacy.noise_multiplier=1.0", "privacy.secure_aggregation=true"), "client", True),
)


@dataclass(frozen=True)
class Settings:
    rounds: int = 3
    canaries: int = 200
    max_examples: int = 800
    eval_size: int = 100
    precision: str = "32"
    quick: bool = False


QUICK_SETTINGS = Settings(rounds=2, canaries=32, max_examples=16, eval_size=4, quick=True)


def part_precision(c: Config, s: Settings) -> str:
    """``--precision`` for every part except DP-SGD's, which trains exact fp32 (bf16 is refused with DP-SGD)."""
    return "32" if "dpsgd" in c.name else s.precision


def overrides(c: Config, s: Settings, clip: float | None) -> list[str]:
    out = [f"name=audit_{c.name}", "partition.method=iid", "federation.algorithm=gradualdiff",
           f"federation.rounds={s.rounds}", "train.local_steps=10", "train.local_epochs=1",
           f"train.precision={part_precision(c, s)}",
           f"data.max_examples={s.max_examples}", f"data.eval_size={s.eval_size}", "eval.every=1",
           "eval.bleu_samples=0", "output.save_adapter=false", f"privacy.audit.canaries={s.canaries}", *c.overrides]
    if c.needs_clip:  # the noise is the point here: no guard rejects a round for the change it makes
        out += [f"privacy.clip={clip:.3g}", "federation.max_change_ratio=null"]
    return out + (QUICK if s.quick else [])


def recipe_of(c: Config, s: Settings, clip: float | None):
    from fedllm.config import load_recipe  # noqa: PLC0415  (heavy imports only when running)

    return load_recipe(RECIPE, overrides(c, s, clip))


# ----------------------------------------------------------------------------- the plan


def estimate_hours(c: Config, s: Settings) -> float:
    """CPU hours of one part by the cost model above (every round's evaluation and canary scoring)."""
    train = (s.max_examples - s.eval_size + (s.canaries / 2 if c.unit == "example" else 0)) * TOKENS_PER_EXAMPLE
    tps = TRAIN_TPS * (BF16_SPEEDUP if part_precision(c, s) == "bf16" else 1)
    train_s = s.rounds * train / tps * (DPSGD_FACTOR if "dpsgd" in c.name else 1)
    eval_s = (s.rounds + 1) * s.eval_size * TOKENS_PER_EXAMPLE / EVAL_TPS
    secagg = "secagg" in c.name
    passes = 0 if c.unit == "client" else (1 if secagg else 3)  # uploads: the client's canaries, then the new global
    audit_s = (s.rounds * passes + 2) * s.canaries * TOKENS_PER_CANARY / EVAL_TPS if c.unit == "example" else 20 * s.rounds
    return (train_s + eval_s + audit_s) / 3600


def print_plan(s: Settings, configs: list[Config]) -> float:
    total = 0.0
    for c in configs:
        h = estimate_hours(c, s)
        total += h
        print(f"  {c.name:16s} {c.label:38s} {c.unit:7s} canaries  ~{h:.2f} CPU h")
    size = "the tiny model, 6 steps a round" if s.quick else "SmolLM2 NF4, one epoch a round"
    print(f"total: {len(configs)} parts, ~{total:.1f} CPU hours ({size}, {s.rounds} rounds, {s.max_examples} "
          f"examples, {s.canaries} canaries; training at {TRAIN_TPS:g} tokens/s in fp32"
          f"{f' and {BF16_SPEEDUP:g}x that in bf16 (DP-SGD stays fp32)' if s.precision == 'bf16' else ''}, "
          f"evaluation at {EVAL_TPS:g}, DP-SGD at {DPSGD_FACTOR:g}x)")
    return total


# ----------------------------------------------------------------------------- running


def run_part(c: Config, s: Settings, clip: float | None, runs: Path, folder: Path, cache: dict) -> dict[str, Any]:
    """Run one configuration (unless recorded) and record it from its run directory's files."""
    from fedllm.federation.modes import run_federated  # noqa: PLC0415

    recipe = recipe_of(c, s, clip)
    if (rec := recorded(folder / f"{c.name}.json", recipe)) is not None:
        return rec
    path = runs / recipe.name / "federated"
    if not finished_run(path, recipe):
        exp = cache.get(c.unit)
        if exp is None:
            from fedllm.experiments import make_experiment  # noqa: PLC0415

            cache.clear()  # one base model in memory at a time; the canary kind changes the data
            exp = cache[c.unit] = make_experiment(recipe)
        exp.recipe = recipe
        if hasattr(exp, "_dp_history"):
            exp._dp_history = {}  # DP-SGD's per-client accountant history is per run
        t0, c0 = time.perf_counter(), time.process_time()
        if not _same_recipe(path, recipe):  # checkpoints of another recipe (e.g. an older clip) cannot resume
            shutil.rmtree(path / "checkpoints", ignore_errors=True)
        run_federated(exp, out=str(runs), resume=any((path / "checkpoints").glob("*")))
        (path / "study_time.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0,
                                                          "cpu_s": time.process_time() - c0}))
    return record(c, recipe, path, folder)


def _same_recipe(path: Path, recipe) -> bool:
    from fedllm.config import RecipeError, load_recipe  # noqa: PLC0415

    try:
        return (path / "config.yaml").is_file() and load_recipe(path / "config.yaml") == recipe
    except RecipeError:
        return False


def record(c: Config, recipe, path: Path, folder: Path) -> dict[str, Any]:
    """A finished part: the audit (recomputed from its files), utility and ε per round."""
    from fedllm.config import dump_recipe  # noqa: PLC0415
    from fedllm.federation.audit_report import write_audit  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics, write_json_atomic  # noqa: PLC0415

    rows = read_metrics(path)
    audit = write_audit(path, recipe, rows[-1])
    scores = [json.loads(x) for x in (path / "audit" / "scores.jsonl").read_text().splitlines() if x.strip()]
    timing = path / "study_time.json"
    rec = {"recipe": dump_recipe(recipe), "config": asdict(c), "audit": audit,
           "round1_change_norm": next((r.get("norm") for r in scores if r.get("round") == 1
                                       and r.get("view") == "aggregate"), None),
           "rows": [{k: r.get(k) for k in ("round", "eval_loss", "perplexity", "epsilon", "epsilon_central",
                                           "epsilon_dpsgd") if k in r} for r in rows],
           **(json.loads(timing.read_text()) if timing.is_file() else {})}
    write_json_atomic(folder / f"{c.name}.json", rec)
    return rec


def run_study(s: Settings, configs: list[Config], runs: Path, out: Path, execute: bool) -> dict[str, Any]:
    """No DP first (it fixes the clip C), then the rest; report-only reads what is recorded."""
    folder = parts_folder(out, s.quick)
    folder.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict] = {}
    cache: dict = {}
    nodp = CONFIGS[0]
    first = (run_part(nodp, s, None, runs, folder, cache) if execute
             else recorded(folder / "nodp.json", recipe_of(nodp, s, None)))
    if first is None:
        return {"records": records, "clip": None}
    records["nodp"] = first
    clip = float(f"{first['round1_change_norm']:.2g}")
    for c in configs:
        if c.name == "nodp":
            continue
        rec = (run_part(c, s, clip, runs, folder, cache) if execute
               else recorded(folder / f"{c.name}.json", recipe_of(c, s, clip)))
        if rec is not None:
            records[c.name] = rec
            b = rec["audit"]["bounds"]["final"]
            claim = b["claimed_epsilon"]  # null in a recorded part: no claim (∞)
            print(f"  {c.name}: audited eps >= {b['epsilon']:.3g} (accountant "
                  f"{'inf' if claim is None else format(claim, '.3g')})", flush=True)
    return {"records": records, "clip": clip}


def main(argv: list[str] | None = None) -> int:
    from fedllm.studies.privacy_audit_report import write_report  # noqa: PLC0415

    p = study_parser("privacy_audit", __doc__)
    p.add_argument("--quick", action="store_true", help="every part on the tiny model (CI, a few minutes)")
    p.add_argument("--plan", action="store_true", help="print the parts and the CPU-hour estimate; run nothing")
    p.add_argument("--only", help="comma-separated part names (no DP always runs: it fixes the clip)")
    p.add_argument("--rounds", type=int, default=Settings.rounds)
    p.add_argument("--canaries", type=int, default=Settings.canaries)
    p.add_argument("--max-examples", type=int, default=Settings.max_examples)
    p.add_argument("--precision", default="32", choices=("32", "bf16"), help="client training numerics")
    args = p.parse_args(argv)
    s = QUICK_SETTINGS if args.quick else Settings(args.rounds, args.canaries, args.max_examples,
                                                   Settings.eval_size, args.precision)
    names = set(args.only.split(",")) if args.only else {c.name for c in CONFIGS}
    unknown = names - {c.name for c in CONFIGS}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}; expected some of {[c.name for c in CONFIGS]}")
    configs = [c for c in CONFIGS if c.name in names or c.name == "nodp"]
    if args.plan:
        print_plan(s, configs)
        return 0
    quiet_process()
    t0 = time.perf_counter()
    doc = run_study(s, configs, Path(args.runs), Path(args.out), execute=not args.report_only)
    doc["meta"] = {"settings": asdict(s), "machine": machine_line(), "wall_s": time.perf_counter() - t0,
                   "command": "python -m fedllm.studies.privacy_audit --out " + args.out
                   + (" --quick" if args.quick else "")}
    write_report(doc, Path(args.out), Path(args.readme) if args.readme else None)
    print(f"wrote {args.out}/privacy_audit_study.md (.json, .png): {len(doc['records'])} parts recorded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
