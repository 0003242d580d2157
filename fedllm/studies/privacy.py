"""The privacy–utility study (issue 5): what a stated ε costs in perplexity (LLM) and accuracy (CNN).

Two recipes under ``recipes/studies/``, each run through the real engine
(:func:`fedllm.federation.modes.run_federated`) once per variant:

- ``privacy_lm.yaml``: the tiny llama with LoRA, 6 iid clients, 3 per round (q = 0.5), client-level
  DP-FedAvg with server noise (McMahan et al., 2018): each delta clipped to C, N(0, (σC/K)²) added
  to the mean. ε from opacus' RDP accountant at δ = 1e-5 after the planned rounds.
- ``privacy_fmnist.yaml``: LeNet-300-100 on Fashion-MNIST, 10 iid clients, 5 per round (q = 0.5),
  the same client-level σ grid; plus sample-level DP-SGD (Opacus, per-sample clip, batch noise) on
  every client with no client-level noise, whose ε is per client and per example (a different
  unit: it protects one training image of a client, not a whole client).

The clip C is chosen from data, and said so: the median L2 norm of the clients' round-1 deltas in
the non-private run (a non-private choice; adaptive clipping, ``privacy.adaptive_clip``, is the
private way). Variants: no DP, then σ ∈ {0 (clip only), 0.5, 1, 2} at that C.

One command writes ``privacy_study.md`` (tables), ``.json`` (every round of every run) and
``.png`` (ε vs perplexity, ε vs accuracy) to ``--out``::

    nice -n 19 python -m fedllm.studies.privacy --out docs/privacy_study [--quick] [--only lm|vision]

The two parts can run as two processes (``--only lm --out A``, ``--only vision --out B``) and be
joined with ``--merge A/privacy_study.json B/privacy_study.json --out docs/privacy_study``.

Each part builds its experiment once (the 4-bit model, the image tensors) and swaps the recipe
between variants; run directories go to ``--runs`` (default ``runs/privacy_study``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes" / "studies"
SIGMAS = (0.0, 0.5, 1.0, 2.0)
DPSGD_NOISE = (1.0,)


@dataclass(frozen=True)
class Part:
    """One recipe of the study and how ``--quick`` shrinks it."""

    name: str
    recipe: str
    quick: list[str]
    title: str


PARTS = (
    Part("lm", "privacy_lm.yaml", ["federation.rounds=2", "train.local_steps=2"],
         "Tiny llama + LoRA, 6 iid clients, 3 per round (q = 0.5)"),
    Part("vision", "privacy_fmnist.yaml", ["federation.rounds=2", "data.max_examples=1000", "data.eval_size=500"],
         "LeNet-300-100 on Fashion-MNIST (3,000 images), 10 iid clients, 5 per round (q = 0.5)"),
)

KEEP = ("round", "eval_loss", "perplexity", "accuracy", "train_loss", "epsilon", "epsilon_central", "epsilon_dpsgd",
        "noise_multiplier", "dp_clip", "dp_unclipped_fraction", "dp_mean_update_norm", "applied", "clients")


def variants(part: Part, clip: float) -> dict[str, list[str]]:
    """label -> recipe overrides (after the non-private run has fixed ``clip``)."""
    out = {f"DP-FedAvg σ={s:g}": ["privacy.dp=server", f"privacy.clip={clip:.3g}", f"privacy.noise_multiplier={s}"]
           for s in SIGMAS}
    if part.name == "lm":  # the same σ with the noise added on the clients: who ε holds against
        out["client noise σ=1"] = ["privacy.dp=client", f"privacy.clip={clip:.3g}", "privacy.noise_multiplier=1.0"]
        out["client noise + secagg σ=1"] = ["privacy.dp=client", "privacy.secure_aggregation=true",
                                            f"privacy.clip={clip:.3g}", "privacy.noise_multiplier=1.0"]
    out.update({f"DP-SGD σ={s:g}": ["privacy.dp=none", "privacy.dpsgd=true", f"privacy.dpsgd_noise={s}"]
                for s in DPSGD_NOISE})
    return out


# ----------------------------------------------------------------------------- running


class Recorder:
    """Wraps ``exp.fit`` to keep, per round, each client's delta norm and its DP-SGD ε (if any)."""

    def __init__(self, exp) -> None:
        self.exp, self.fit = exp, exp.fit
        self.norms: dict[int, list[float]] = {}
        self.dpsgd_eps: dict[int, float] = {}
        self.dpsgd_steps: dict[int, tuple[int, int]] = {}  # client -> (its examples, DP-SGD steps so far)
        exp.fit = self

    def __call__(self, client_id, examples, start, rnd, steps, grad_term=None):
        from fedllm.types import global_norm  # noqa: PLC0415

        update = self.fit(client_id, examples, start, rnd, steps, grad_term=grad_term)
        self.norms.setdefault(rnd, []).append(global_norm(update.delta))
        if "dpsgd_epsilon" in update.metrics:
            self.dpsgd_eps[client_id] = float(update.metrics["dpsgd_epsilon"])
            n, done = self.dpsgd_steps.get(client_id, (len(examples), 0))
            self.dpsgd_steps[client_id] = (n, done + update.local_steps)
        return update

    def reset(self) -> None:
        self.norms, self.dpsgd_eps, self.dpsgd_steps = {}, {}, {}
        if hasattr(self.exp, "_dp_history"):  # VisionExperiment's per-client DP-SGD accountant history
            self.exp._dp_history = {}


def run_variant(exp, rec: Recorder, part: Part, label: str, overrides: list[str], runs: Path,
                quick: bool) -> dict[str, Any]:
    """Run one variant federated on the shared experiment; its rows are read back from the run files."""
    from fedllm.config import load_recipe  # noqa: PLC0415  (heavy imports only when running)
    from fedllm.federation.modes import run_federated  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics  # noqa: PLC0415

    slug = "".join(c if c.isalnum() else "_" for c in label.replace("σ=", "sigma")).strip("_").lower()
    extra = [f"name={part.name}_{slug}", *(part.quick if quick else [])]
    recipe = load_recipe(RECIPES / part.recipe, [*overrides, *extra])
    exp.recipe = recipe
    rec.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    run_federated(exp, out=str(runs))
    rows = [{k: r.get(k) for k in KEEP} for r in read_metrics(runs / recipe.name / "federated")]
    out = {"label": label, "overrides": overrides + extra, "recipe": part.recipe, "rows": rows,
           "round1_norms": rec.norms.get(1, []), "wall_s": time.perf_counter() - t0,
           "cpu_s": time.process_time() - c0, "sigma": recipe.privacy.noise_multiplier if recipe.privacy.enabled else None,
           "clip": recipe.privacy.clip if recipe.privacy.enabled else None, "rounds": recipe.federation.rounds,
           "q": recipe.clients_per_round / recipe.partition.num_clients, "dp": recipe.privacy.dp,
           "secure_aggregation": recipe.privacy.secure_aggregation, "num_clients": recipe.partition.num_clients,
           "per_round": recipe.clients_per_round, "delta": recipe.privacy.delta}
    out["independent_epsilon"] = independent_epsilon(out, recipe, rec.dpsgd_steps)
    if recipe.privacy.dpsgd:
        out.update(dpsgd_sigma=recipe.privacy.dpsgd_noise, dpsgd_clip=recipe.privacy.dpsgd_clip,
                   dpsgd_epsilon_max=max(rec.dpsgd_eps.values(), default=math.nan),
                   dpsgd_epsilon_median=statistics.median(rec.dpsgd_eps.values()) if rec.dpsgd_eps else math.nan,
                   dpsgd_clients=len(rec.dpsgd_eps))
    return out


def run_part(part: Part, runs: Path, quick: bool) -> dict[str, Any]:
    from fedllm.config import load_recipe  # noqa: PLC0415
    from fedllm.experiments import make_experiment  # noqa: PLC0415

    log = logging.getLogger(__name__)
    t0 = time.perf_counter()
    exp = make_experiment(load_recipe(RECIPES / part.recipe, ["privacy.dp=none", *(part.quick if quick else [])]))
    build_s = time.perf_counter() - t0
    rec = Recorder(exp)
    results = {"no DP": run_variant(exp, rec, part, "no DP", ["privacy.dp=none"], runs, quick)}
    clip = float(f"{statistics.median(results['no DP']['round1_norms']):.2g}")
    log.info("%s: clip C = %.3g (median round-1 update norm of the non-private run)", part.name, clip)
    _print(part, results["no DP"])
    for label, overrides in variants(part, clip).items():
        results[label] = run_variant(exp, rec, part, label, overrides, runs, quick)
        _print(part, results[label])
    return {"title": part.title, "recipe": part.recipe, "clip": clip, "build_s": build_s, "runs": results}


def _print(part: Part, run: dict[str, Any]) -> None:
    last = run["rows"][-1]
    util = (f"accuracy {100 * last['accuracy']:.2f} %" if last.get("accuracy") is not None
            else f"perplexity {last['perplexity']:.3f}")
    print(f"  {part.name:6s} {run['label']:18s} ε={_eps_text(run):>10s}  {util}  ({run['wall_s']:.0f} s)", flush=True)


# ----------------------------------------------------------------------------- an independent ε


def independent_epsilon(run: dict[str, Any], recipe: Any, dpsgd_steps: dict[int, tuple[int, int]]) -> float | None:
    """ε for the mechanism the run applied, from the recipe alone (not fedllm's ledger).

    DP-FedAvg: m of n clients without replacement each round, Google's ``dp_accounting`` RDP
    (replace-one), at the noise multiplier the server-side observer faces: σ, or σ/√m when each
    client adds its own share and no secure aggregation hides the uploads. DP-SGD: opacus' RDP for
    Poisson sampling, per client, over the steps it ran (q = batch / examples for LoRA clients,
    1 / batches for vision clients), max over clients.
    """
    import dp_accounting  # noqa: PLC0415
    from dp_accounting.rdp import rdp_privacy_accountant  # noqa: PLC0415
    from opacus.accountants import RDPAccountant  # noqa: PLC0415

    logging.getLogger("absl").setLevel(logging.ERROR)
    if recipe.privacy.dpsgd:
        eps = []
        for n, steps in dpsgd_steps.values():
            b = recipe.train.batch_size
            q = min(1.0, b / n) if recipe.model.task == "lm" else 1.0 / math.ceil(n / b)
            acc = RDPAccountant()
            acc.history = [(recipe.privacy.dpsgd_noise, q, steps)]
            eps.append(acc.get_epsilon(recipe.privacy.delta))
        return max(eps) if eps else None
    if not recipe.privacy.enabled:
        return None
    sigma, m, n = recipe.privacy.noise_multiplier, recipe.clients_per_round, recipe.partition.num_clients
    if sigma == 0:
        return math.inf
    if recipe.privacy.dp == "client" and not recipe.privacy.secure_aggregation:
        sigma /= math.sqrt(m)
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.GaussianDpEvent(sigma)
    if m < n:
        event = dp_accounting.SampledWithoutReplacementDpEvent(n, m, event)
    acc.compose(event, recipe.federation.rounds)
    return float(acc.get_epsilon(recipe.privacy.delta))


# ----------------------------------------------------------------------------- tables


def epsilon(run: dict[str, Any]) -> float | None:
    """Client-level ε after the last round (inf for σ = 0 with clipping; None without DP)."""
    if run.get("dpsgd_sigma") is not None:
        return run["dpsgd_epsilon_max"]
    if run["sigma"] is None:
        return None
    eps = run["rows"][-1].get("epsilon")
    return math.inf if eps is None else eps


def _fmt(eps: float | None) -> str:
    return "—" if eps is None else "∞" if math.isinf(eps) else f"{eps:.3g}"


def _eps_text(run: dict[str, Any]) -> str:
    return _fmt(epsilon(run))


def _mechanism(run: dict[str, Any]) -> str:
    if run.get("dpsgd_sigma") is not None:
        return "sample-level DP-SGD (per client, per example)"
    if run["sigma"] is None:
        return "none"
    if run.get("dp") == "client":
        return ("client-level, noise on the clients, secure aggregation (ε holds against the server)"
                if run.get("secure_aggregation") else "client-level, noise on the clients (ε against the server: σ/√m)")
    return "client-level DP-FedAvg, trusted server adds the noise"


def table(part: dict[str, Any], name: str) -> str:
    metric = "final accuracy (%)" if name == "vision" else "final perplexity"
    lines = [f"| variant | mechanism | σ | clip | fedllm ε at δ=1e-5 | independent ε | aggregate-only ε | "
             f"{metric} | round-0 | wall (s) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in part["runs"].values():
        first, last = run["rows"][0], run["rows"][-1]
        if name == "vision":
            util, start = f"{100 * last['accuracy']:.2f}", f"{100 * first['accuracy']:.2f}"
        else:
            util, start = f"{last['perplexity']:.3f}", f"{first['perplexity']:.3f}"
        if run.get("dpsgd_sigma") is not None:
            sigma, clip = run["dpsgd_sigma"], run["dpsgd_clip"]
        elif run["sigma"] is None:
            sigma, clip = "—", "—"
        else:
            sigma, clip = run["sigma"], run["clip"]
        central = last.get("epsilon_central")
        lines.append(f"| {run['label']} | {_mechanism(run)} | {sigma} | {clip} | {_eps_text(run)} | "
                     f"{_fmt(run.get('independent_epsilon'))} | {_fmt(central) if central is not None else '—'} | "
                     f"{util} | {start} | {run['wall_s']:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


def plot(results: dict[str, Any], path: Path) -> None:
    """ε (log scale) against final perplexity / accuracy; the non-private and σ=0 runs as lines."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = [n for n in ("lm", "vision") if n in results]
    fig, axes = plt.subplots(1, len(names), figsize=(5.6 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        def util(run: dict[str, Any], name: str = name) -> float:
            last = run["rows"][-1]
            return 100 * last["accuracy"] if name == "vision" else last["perplexity"]

        groups: dict[str, list[tuple[float, float, str]]] = {}
        for run in results[name]["runs"].values():
            eps = epsilon(run)
            if eps is None or math.isinf(eps):
                style = ":" if eps is None else "--"
                ax.axhline(util(run), linestyle=style, color="grey" if eps is None else "tab:orange",
                           label=f"{run['label']} (ε {'—' if eps is None else '∞'})")
                continue
            kind = "DP-SGD (per-example ε)" if run.get("dpsgd_sigma") is not None else "DP-FedAvg (client-level ε)"
            groups.setdefault(kind, []).append((eps, util(run), run["label"].split()[-1]))
        for kind, pts in groups.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=kind)
            for eps, u, text in pts:
                ax.annotate(text, (eps, u), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("ε at δ = 1e-5 (after all rounds)")
        ax.set_ylabel("test accuracy (%)" if name == "vision" else "held-out perplexity")
        ax.set_title(results[name]["title"], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- report


def write_report(results: dict[str, Any], out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy_study.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                       default=lambda v: None), encoding="utf-8")
    plot(results, out / "privacy_study.png")
    parts = ["# Privacy–utility study", "",
             f"Produced by `{meta['command']}` ({'quick' if meta['quick'] else 'full'} settings; "
             f"{meta['cpu_s']:.0f} s CPU, {meta['wall_s']:.0f} s wall, at nice 19 on a shared 2-core machine). "
             "Recipes: `recipes/studies/privacy_*.yaml`; raw numbers (every round of every run): "
             "`privacy_study.json`; plot: `privacy_study.png`.", "",
             "fedllm ε is what the run wrote (metrics.jsonl), at δ = 1e-5 over all rounds, for the sampler it used: "
             "client-level, m of n clients without replacement each round (RDP for sampling without replacement, "
             "Google's dp_accounting, replace-one); DP-SGD, each client's own opacus RDP accountant over every "
             "optimizer step on its Poisson batches, max over clients. *Independent ε* recomputes it from the "
             "recipe alone with dp_accounting / opacus directly (fedllm.studies.privacy.independent_epsilon). "
             "With the noise on the clients and no secure aggregation the server sees each upload with σ/√m of "
             "noise: ε is accounted at that, and the aggregate-only ε is given beside it. The clip C is the "
             "median L2 norm of the clients' round-1 deltas in the non-private run (a data-dependent, non-private "
             "choice, stated here).", ""]
    if meta.get("parts"):
        parts[2:2] = ["Run as " + " and ".join(f"`{c}`" for c in meta["parts"]) + " in parallel, joined by "
                      "`--merge` (each part builds its own experiment from its recipe and seed, as the one command does).", ""]
    for name, part in results.items():
        parts += [f"## {part['title']}", "", f"Recipe `recipes/studies/{part['recipe']}`, clip C = {part['clip']:.3g}.",
                  "", table(part, name), ""]
    parts += ["![privacy-utility](privacy_study.png)", "", "## Reading it", "",
              "- The two ε columns are different units: DP-FedAvg's ε protects a whole client (all its data, "
              "q = clients per round / clients); DP-SGD's protects one example of one client (q = 1 / batches "
              "per epoch of that client) and says nothing about a client's data as a whole.",
              "- DP-FedAvg adds N(0, (σC/K)²) to every coordinate of the mean, a noise vector of norm about "
              "σC·√d / K against a signal of norm at most C; with K = 3 or 5 clients per round and d from "
              "1,792 (the tiny LoRA adapter) to 266k (LeNet) the noise dominates once σ ≈ 1. Client-level DP is a tool "
              "for federations with hundreds of clients per round; these toy federations show the trend, not a "
              "usable operating point.",
              "- The tiny llama is a random-weight model (perplexity near its vocabulary size); its column shows "
              "the direction and size of the effect on a LoRA run, not language-model quality.",
              "- `dp_unclipped_fraction` in the JSON: after round 1 the clip binds on every update (norms grow), "
              "so σ = 0 already differs slightly from no DP (clipping bias).", ""]
    (out / "privacy_study.md").write_text("\n".join(parts), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedllm.studies.privacy", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/privacy_study", help="where the .md/.json/.png go")
    parser.add_argument("--runs", default="runs/privacy_study", help="run directories")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and examples (smoke test)")
    parser.add_argument("--only", choices=[p.name for p in PARTS], help="run one part")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="no runs: rebuild the report from these "
                        "privacy_study.json files (e.g. the parts run as two --only processes)")
    args = parser.parse_args(argv)
    if args.merge:
        loaded = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge]
        results = {k: v for d in loaded for k, v in d["results"].items()}
        metas = [d["meta"] for d in loaded]
        meta = {**metas[0], "command": "python -m fedllm.studies.privacy --out " + args.out
                + (" --quick" if metas[0]["quick"] else ""), "parts": [m["command"] for m in metas],
                "wall_s": max(m["wall_s"] for m in metas), "cpu_s": sum(m["cpu_s"] for m in metas)}
        write_report(results, Path(args.out), meta)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).setLevel(logging.INFO)
    warnings.filterwarnings("ignore")
    t0, c0 = time.perf_counter(), time.process_time()
    results = {}
    for part in PARTS:
        if args.only and part.name != args.only:
            continue
        results[part.name] = run_part(part, Path(args.runs), args.quick)
    command = "python -m fedllm.studies.privacy --out " + args.out + (" --quick" if args.quick else "") + (
        f" --only {args.only}" if args.only else "")
    meta = {"command": command, "quick": args.quick, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "sigmas": list(SIGMAS), "dpsgd_noise": list(DPSGD_NOISE)}
    write_report(results, Path(args.out), meta)
    print(f"wrote {args.out}/privacy_study.{{md,json,png}} ({meta['wall_s']:.0f} s wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
