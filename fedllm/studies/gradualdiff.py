"""The headline study (issue 17): GradualDiff-Fed vs centralized vs local-only on a real 4-bit model.

The GradualDiff-Fed paper's Tables III–IV compare, for five clients, the federated model against one
trained centrally on the pooled data and against each client training alone, by perplexity, BLEU
and time per round. This study asks the same of ``recipes/studies/gradualdiff.yaml`` (SmolLM2-135M-
Instruct in NF4, LoRA on every linear layer, the coralmap library) on two partitions of the same
examples: ``iid`` (uniform) and ``natural`` (one entry type per client, sizes as they fall), the
paper's open question. The three modes of one (partition, seed) see the same split, the same
held-out examples and matched optimizer steps (centralized runs each round as many steps as the
whole federation; ``fedllm.federation.modes``).

A *part* is one (partition, seed, mode). Each part is a run directory under ``--runs``
(``gradualdiff_<partition>_s<seed>/<mode>``); a finished part with an identical recipe is skipped,
and a federated part continues from its last checkpoint, so the study is resumable by part. Parts
can run as separate processes (``--part iid:0:federated --part iid:0:centralized``); any process
then writes the report from every finished part it finds (``--report-only``)::

    nice -n 19 python -m fedllm.studies.gradualdiff --out docs/gradualdiff_study [--quick]
        [--seeds 0,1] [--local-seeds 0] [--spread-partition iid] [--partition iid] [--part P:S:MODE ...]
        [--report-only]
        [--readme docs/results/gradualdiff.md]

Writes ``gradualdiff_study.json`` (every round of every part), ``gradualdiff_study.md`` (tables) and
one ``loss_<partition>.png`` per partition to ``--out``; ``--readme`` replaces that page's block (docs/results/gradualdiff.md: the study's docs page)
between the ``gradualdiff-study`` markers with the tables rendered from that JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

from fedllm.studies import finished_run, machine_line, quiet_process, replace_block

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "studies" / "gradualdiff.yaml"
MODES = ("federated", "centralized", "local")
PARTITIONS = {
    "iid": ["partition.method=iid"],
    "natural": ["partition.method=natural", "partition.column=topic"],
}
QUICK = ["model.preset=tiny", "model.quantization=none", "lora.target_modules=[q_proj,v_proj]",
         "data.max_examples=120", "data.eval_size=24", "federation.rounds=2", "train.local_steps=1",
         "eval.bleu_samples=4", "eval.max_new_tokens=8", "eval.every=1"]
# The paper's Tables III (perplexity, BLEU) and IV (time per round, s): 4-bit Llama-2-7B, LoRA r 64.
PAPER = {"perplexity": {"federated": 16.78, "centralized": 15.36, "local": 19.20},
         "bleu": {"federated": 0.55, "centralized": 0.55, "local": 0.47},
         "round_s": {"federated": 4.3, "centralized": 6.7, "local": 4.1}}
# Local mode trains one model per client: evaluating all five mid-run costs five federated evaluations,
# so the full study scores the local models at round 0 and at the end only.
MODE_OVERRIDES = {"local": ["eval.every=10"]}
GOAL_FED_OVER_CENTRAL = 1.10  # federated perplexity <= 1.10 x centralized (IID)
GOAL_LOCAL_OVER_FED = 1.15  # local-mean perplexity >= 1.15 x federated (IID)
MARK_START, MARK_END = "<!-- gradualdiff-study:start -->", "<!-- gradualdiff-study:end -->"
KEEP = ("round", "eval_loss", "eval_loss_se", "perplexity", "bleu", "train_loss", "round_time_s", "train_time_s",
        "aggregate_time_s", "eval_time_s", "bytes_up", "bytes_down", "local_steps", "per_client", "clients")

log = logging.getLogger(__name__)


def part_name(partition: str, seed: int) -> str:
    return f"gradualdiff_{partition}_s{seed}"


def part_overrides(partition: str, seed: int, quick: bool, mode: str = "federated") -> list[str]:
    return [f"name={part_name(partition, seed)}", f"seed={seed}", *PARTITIONS[partition], *(QUICK if quick else []),
            *([] if quick else MODE_OVERRIDES.get(mode, []))]


def part_recipe(partition: str, seed: int, mode: str, quick: bool):
    from fedllm.config import load_recipe  # noqa: PLC0415

    return load_recipe(RECIPE, part_overrides(partition, seed, quick, mode))


def plan(partitions: list[str], seeds: list[int], local_seeds: list[int],
         spread: list[str] | None = None) -> list[tuple[str, int, str]]:
    """Every (partition, seed, mode) to run: all modes for ``local_seeds``; for the other seeds,
    federated and centralized (the gap the seeds spread) on the ``spread`` partitions (all if None)."""
    return [(p, s, m) for s in seeds for p in partitions for m in MODES
            if s in local_seeds or (m != "local" and (spread is None or p in spread))]


def parse_part(text: str) -> tuple[str, int, str]:
    try:
        partition, seed, mode = text.split(":")
        if partition not in PARTITIONS or mode not in MODES:
            raise ValueError
        return partition, int(seed), mode
    except ValueError:
        raise SystemExit(f"--part: expected PARTITION:SEED:MODE with PARTITION in {sorted(PARTITIONS)} and MODE in "
                         f"{list(MODES)}, got {text!r}") from None


# ----------------------------------------------------------------------------- running


def run_parts(parts: list[tuple[str, int, str]], runs: Path, quick: bool) -> None:
    """Run the unfinished parts; one experiment (one 4-bit model) per (partition, seed)."""
    from fedllm.experiments import make_experiment  # noqa: PLC0415  (heavy imports only when running)
    from fedllm.federation.modes import run_centralized, run_federated, run_local  # noqa: PLC0415

    runners = {"federated": lambda e: run_federated(e, out=str(runs), resume=_has_checkpoint(e, runs)),
               "centralized": lambda e: run_centralized(e, out=str(runs)),
               "local": lambda e: run_local(e, out=str(runs))}
    groups: dict[tuple[str, int], list[str]] = {}
    for partition, seed, mode in parts:
        groups.setdefault((partition, seed), []).append(mode)
    for (partition, seed), modes in groups.items():
        recipes = {m: part_recipe(partition, seed, m, quick) for m in modes}
        todo = [m for m in modes if not finished_run(runs / recipes[m].name / m, recipes[m])]
        for m in sorted(set(modes) - set(todo)):
            print(f"  {partition:8s} seed {seed} {m:12s} finished earlier (same recipe): kept", flush=True)
        if not todo:
            continue
        exp = make_experiment(recipes[todo[0]])
        for mode in todo:
            exp.recipe = recipe = recipes[mode]  # modes differ only in evaluation cadence: same data and model
            t0, c0 = time.perf_counter(), time.process_time()
            summary = runners[mode](exp)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            path = runs / recipe.name / mode
            summary_path = path / "summary.json"
            on_disk = json.loads(summary_path.read_text(encoding="utf-8"))
            summary_path.write_text(json.dumps({**on_disk, "study_wall_s": wall, "study_cpu_s": cpu,
                                                "torch_threads": _threads()}, indent=1), encoding="utf-8")
            ppl = summary.get("final", {}).get("perplexity") if isinstance(summary.get("final"), dict) else None
            print(f"  {partition:8s} seed {seed} {mode:12s} done in {wall:.0f} s"
                  + (f" (perplexity {ppl:.2f})" if ppl else ""), flush=True)


def _has_checkpoint(exp, runs: Path) -> bool:
    from fedllm.federation.checkpoint import checkpoint_dir  # noqa: PLC0415

    folder = checkpoint_dir(runs / exp.recipe.name / "federated")
    return folder.is_dir() and any(folder.iterdir()) and not (runs / exp.recipe.name / "federated" / "summary.json").is_file()


def _threads() -> int:
    import torch  # noqa: PLC0415

    return torch.get_num_threads()


def score_examples(runs: Path, partition: str, seed: int, quick: bool) -> None:
    """Per-example held-out NLL of the final federated and centralized adapters of one (partition, seed),
    written once to each run directory (``example_nll.json``) for the paired comparison.

    Each adapter is read back from the run's own ``adapter/`` folder; its token-weighted mean must
    equal the run's final ``eval_loss`` (the same examples, the same model), or this raises.
    """
    from safetensors.torch import load_file  # noqa: PLC0415

    from fedllm.client.evaluate import example_nll  # noqa: PLC0415
    from fedllm.experiments import make_experiment  # noqa: PLC0415
    from fedllm.federation.rundir import read_metrics  # noqa: PLC0415

    recipe = part_recipe(partition, seed, "federated", quick)
    paths = [runs / recipe.name / m for m in ("federated", "centralized")]
    todo = [p for p in paths if finished_run(p, part_recipe(partition, seed, p.name, quick))
            and not (p / "example_nll.json").is_file()]
    if not todo:
        return
    exp = make_experiment(recipe)
    for path in todo:
        exp.state.set(load_file(str(path / "adapter" / "adapter_model.safetensors")))
        exp.model.eval()
        sums, counts = example_nll(exp.model, exp.data.eval_examples, exp.tokenizer.pad_token_id,
                                   recipe.eval.batch_size)
        exp.model.train()
        loss = math.fsum(sums) / sum(counts)
        logged = [r["eval_loss"] for r in read_metrics(path) if r.get("eval_loss") is not None][-1]
        if abs(loss - logged) > 1e-4 * max(1.0, abs(logged)):
            raise RuntimeError(f"{path}: the saved adapter scores {loss:.6f}, the run's final eval_loss is {logged:.6f}")
        (path / "example_nll.json").write_text(json.dumps({"sums": sums, "counts": counts}), encoding="utf-8")


def paired_log_ratio(fed: dict[str, list], cen: dict[str, list]) -> tuple[float, float]:
    """log(perplexity_fed / perplexity_cen) on the same examples and its paired SE
    (:func:`fedllm.federation.convergence.paired_log_ratio`, which ``fedllm compare`` uses too)."""
    from fedllm.federation.convergence import paired_log_ratio as pair  # noqa: PLC0415

    return pair(fed, cen)


# ----------------------------------------------------------------------------- collecting


def collect(runs: Path, parts: list[tuple[str, int, str]], quick: bool) -> dict[str, Any]:
    """Every finished part's rows and timings, read from its run directory."""
    from fedllm.federation.rundir import read_metrics  # noqa: PLC0415

    out: dict[str, Any] = {}
    for partition, seed, mode in parts:
        recipe = part_recipe(partition, seed, mode, quick)
        path = runs / recipe.name / mode
        if not finished_run(path, recipe):
            continue
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        rows = [{k: r.get(k) for k in KEEP if k in r} for r in read_metrics(path)]
        clients = json.loads((path / "partition.json").read_text(encoding="utf-8"))
        scored = path / "example_nll.json"
        out.setdefault(partition, {}).setdefault(str(seed), {})[mode] = {
            "example_nll": json.loads(scored.read_text(encoding="utf-8")) if scored.is_file() else None,
            "rows": rows, "wall_s": summary.get("study_wall_s"), "cpu_s": summary.get("study_cpu_s"),
            "torch_threads": summary.get("torch_threads"), "client_sizes": _client_sizes(clients),
            "eval_examples": recipe.data.eval_size, "bleu_samples": recipe.eval.bleu_samples}
    return out


def paired(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per (partition, seed) with both runs re-scored: federated / centralized perplexity, paired 95 % interval."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for partition, seeds in results.items():
        for seed, runs in seeds.items():
            fed, cen = runs.get("federated"), runs.get("centralized")
            if fed and cen and fed["example_nll"] and cen["example_nll"]:
                diff, se = paired_log_ratio(fed["example_nll"], cen["example_nll"])
                out.setdefault(partition, {})[seed] = {
                    "log_ratio": diff, "se": se, "ratio": math.exp(diff),
                    "ratio_95": [math.exp(diff - 1.96 * se), math.exp(diff + 1.96 * se)]}
    return out


def _client_sizes(partition_json: dict[str, Any]) -> list[int] | None:
    clients = partition_json.get("clients")
    if isinstance(clients, list):
        return [len(c) if isinstance(c, list) else int(c) for c in clients]
    if isinstance(clients, dict):
        return [len(v) if isinstance(v, list) else int(v) for v in clients.values()]
    return None


# ----------------------------------------------------------------------------- figures of one part


def final(run: dict[str, Any], key: str) -> float | None:
    """The last evaluated round's value of ``key``."""
    vals = [r.get(key) for r in run["rows"][1:] if r.get("eval_loss") is not None]
    return vals[-1] if vals else None


def round_seconds(run: dict[str, Any]) -> float | None:
    """Mean training + aggregation seconds per round (evaluation excluded; the paper's per-round cost).

    Local mode's rows carry the mean over clients of one client's round, as the paper's local column.
    """
    vals = [(r.get("train_time_s") or 0.0) + (r.get("aggregate_time_s") or 0.0) for r in run["rows"][1:]]
    return statistics.fmean(vals) if vals else None


def client_round_seconds(run: dict[str, Any], mode: str) -> float | None:
    """Mean training seconds of one client's round: a federated round's training divided by the
    clients it ran one after another (what a deployment running them in parallel would take); None
    when a federated row does not say which clients ran."""
    if mode != "federated":
        return round_seconds(run)
    rows = run["rows"][1:]
    if not rows or any(not r.get("clients") for r in rows):
        return None
    return statistics.fmean((r.get("train_time_s") or 0.0) / len(r["clients"]) for r in rows)


def total_bytes(run: dict[str, Any]) -> int:
    return sum(int(r.get("bytes_up") or 0) + int(r.get("bytes_down") or 0) for r in run["rows"][1:])


def gaps(results: dict[str, Any], partition: str) -> list[float]:
    """federated / centralized final perplexity, one per seed with both."""
    out = []
    for runs in results.get(partition, {}).values():
        if "federated" in runs and "centralized" in runs:
            fed, cen = final(runs["federated"], "perplexity"), final(runs["centralized"], "perplexity")
            if fed and cen:
                out.append(fed / cen)
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (min {min(values):.3f}, max " \
           f"{max(values):.3f}; {len(values)} seeds)"


def _per_mode(results: dict[str, Any], partition: str, mode: str, fn) -> list[float]:
    vals = []
    for runs in results.get(partition, {}).values():
        if mode in runs and (v := fn(runs[mode])) is not None:
            vals.append(v)
    return vals


def _cell(vals: list[float], fmt: str) -> str:
    if not vals:
        return "—"
    text = format(statistics.fmean(vals), fmt)
    return text if len(vals) == 1 else f"{text} ± {format(statistics.stdev(vals), fmt)}"


# ----------------------------------------------------------------------------- tables


def main_table(results: dict[str, Any]) -> str:
    """The paper's Tables III–IV shape: per partition and mode, fedllm's mean (± sd over seeds) beside the paper."""
    lines = ["| partition | mode | perplexity | paper | BLEU (sacrebleu, 0–100) | paper (as printed) | s per round "
             "(train) | s per client round | paper | MB sent per run | seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for partition in results:
        for mode in MODES:
            ppl = _per_mode(results, partition, mode, lambda r: final(r, "perplexity"))
            if not ppl:
                continue
            bleu = _per_mode(results, partition, mode, lambda r: final(r, "bleu"))
            secs = _per_mode(results, partition, mode, round_seconds)
            per_client = _per_mode(results, partition, mode, lambda r, m=mode: client_round_seconds(r, m))
            mb = _per_mode(results, partition, mode, lambda r: total_bytes(r) / 1e6)
            label = "local (mean of clients)" if mode == "local" else mode
            lines.append(f"| {partition} | {label} | {_cell(ppl, '.2f')} | {PAPER['perplexity'][mode]} | "
                         f"{_cell(bleu, '.2f')} | {PAPER['bleu'][mode]} | {_cell(secs, '.1f')} | {_cell(per_client, '.1f')} | "
                         f"{PAPER['round_s'][mode]} | {_cell(mb, '.1f')} | {len(ppl)} |")
    return "\n".join(lines)


def goals_table(results: dict[str, Any], pairs: dict[str, Any]) -> str:
    """The two goals of the issue, per partition, with each seed's ratio and the standard error."""
    lines = ["| partition | federated / centralized perplexity (goal ≤ 1.10 on iid) | paired 95 % interval of that "
             "ratio, per seed | local mean / federated (goal ≥ 1.15 on iid) | eval examples | perplexity SE "
             "(relative) |", "|---|---|---|---|---:|---:|"]
    for partition in results:
        fed_cen = gaps(results, partition)
        loc = []
        for runs in results[partition].values():
            if "local" in runs and "federated" in runs:
                lo, fe = final(runs["local"], "perplexity"), final(runs["federated"], "perplexity")
                if lo and fe:
                    loc.append(lo / fe)
        ses = [se for runs in results[partition].values() for m in ("federated", "centralized")
               if m in runs and (se := final(runs[m], "eval_loss_se")) is not None]
        n = next((runs[m]["eval_examples"] for runs in results[partition].values() for m in MODES if m in runs), None)
        se_text = f"{100 * max(ses):.1f} % (max over parts)" if ses else "—"
        ci = [f"s{seed}: {p['ratio']:.3f} [{p['ratio_95'][0]:.3f}, {p['ratio_95'][1]:.3f}]"
              for seed, p in sorted(pairs.get(partition, {}).items())]
        lines.append(f"| {partition} | {_verdict(fed_cen, GOAL_FED_OVER_CENTRAL, below=True)} | "
                     f"{'; '.join(ci) or '—'} | {_verdict(loc, GOAL_LOCAL_OVER_FED, below=False)} | {n} | "
                     f"{se_text} |")
    return "\n".join(lines)


def _verdict(vals: list[float], goal: float, below: bool) -> str:
    if not vals:
        return "—"
    mean = statistics.fmean(vals)
    met = mean <= goal if below else mean >= goal
    return f"{_mean_sd(vals)}: {'met' if met else '**not met**'}"


# ----------------------------------------------------------------------------- plots


def seed_note(seeds: dict[Any, dict[str, Any]]) -> str:
    """What a partition's plot draws per seed, for its title: the first seed solid, the other seeds
    dashed for the modes they ran (a study that ran one seed, or ran later seeds for only some
    modes, must not promise dashed lines that are not there)."""
    order = sorted(seeds)
    rest = order[1:]
    modes = [m for m in MODES if any(m in seeds[s] for s in rest)]
    if not modes:
        return f"seed {order[0]}" if order else "no runs"
    many = "s" if len(rest) > 1 else ""
    return f"seed {order[0]} solid; dashed: seed{many} {', '.join(map(str, rest))} ({', '.join(modes)})"


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """One PNG per partition: held-out eval loss at the evaluated rounds (left) and the clients' mean
    training loss every round (right), three modes, every seed (the first solid, others dashed:
    :func:`seed_note` says which in the title)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # noqa: PLC0415

    names = []
    for partition, seeds in results.items():
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.0))
        for ax, key, start in ((axes[0], "eval_loss", 0), (axes[1], "train_loss", 1)):
            for i, mode in enumerate(MODES):
                for j, (_seed, runs) in enumerate(sorted(seeds.items())):
                    if mode not in runs:
                        continue
                    pts = [(r["round"], r[key]) for r in runs[mode]["rows"][start:] if r.get(key) is not None]
                    label = ("local (mean of clients)" if mode == "local" else mode) if j == 0 else None
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=label,
                            alpha=1.0 if j == 0 else 0.45, linestyle="-" if j == 0 else "--", markersize=4)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("held-out eval loss (response-token NLL)")
        axes[1].set_ylabel("training loss (mean over the round's steps)")
        fig.suptitle(f"GradualDiff-Fed study, {partition} partition ({seed_note(seeds)})", fontsize=10)
        fig.tight_layout()
        name = f"loss_{partition}.png"
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


# ----------------------------------------------------------------------------- report


def setup_line(quick: bool) -> str:
    from fedllm.config import load_recipe  # noqa: PLC0415

    r = load_recipe(RECIPE, part_overrides("iid", 0, quick))
    t = r.train
    return (f"{r.model.preset} ({r.model.quantization}) + LoRA r {r.lora.r}, alpha {r.lora.alpha}, dropout "
            f"{r.lora.dropout} on {', '.join(r.lora.target_modules)}; {r.partition.num_clients} clients, "
            f"{r.federation.rounds} rounds of {t.local_steps} local AdamW steps (batch {t.batch_size}, lr {t.lr}, "
            f"weight decay {t.weight_decay}, max grad norm {t.max_grad_norm}); centralized runs "
            f"{r.partition.num_clients * t.local_steps} steps per round on the pooled data; {r.data.eval_size} held-out "
            f"examples (max length {r.data.max_length}), BLEU on the first {r.eval.bleu_samples} greedy answers "
            f"({r.eval.max_new_tokens} new tokens), evaluated every {r.eval.every} rounds and at the last"
            + ("; the five local models at round 0 and the last only." if not quick else "."))


def readme_block(doc: dict[str, Any]) -> str:
    """The README's section body, rendered from the study's JSON only."""
    results, meta = doc["results"], doc["meta"]
    return "\n".join([MARK_START, "", f"`{meta['command']}` ({'quick' if meta['quick'] else 'full'} settings; "
                      f"tables rendered from `docs/gradualdiff_study/gradualdiff_study.json`). {meta['setup']}", "",
                      main_table(results), "", goals_table(results, doc["paired"]), "", MARK_END])


def write_report(doc: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradualdiff_study.json").write_text(json.dumps(doc, indent=1, default=lambda v: None), encoding="utf-8")
    figures = plot(doc["results"], out)
    parts = ["# GradualDiff-Fed: federated vs centralized vs local-only", "",
             f"Produced by `{doc['meta']['command']}`. {doc['meta']['setup']}", "",
             "## Perplexity, BLEU, time per round (the paper's Tables III and IV)", "",
             "Mean over seeds ± sample standard deviation. Time per round is training plus aggregation, "
             "evaluation excluded, on the machine named below; the paper's is a GPU running a 7B model.", "",
             main_table(doc["results"]), "", "## The goals", "", goals_table(doc["results"], doc["paired"]), "",
             *[f"![eval loss]({name})" for name in figures], "", "## Parts", "",
             "| partition | seed | mode | wall s | CPU s | torch threads |", "|---|---:|---|---:|---:|---:|"]
    for partition, seeds in doc["results"].items():
        for seed, runs in sorted(seeds.items()):
            for mode, run in ((m, runs[m]) for m in MODES if m in runs):
                parts.append(f"| {partition} | {seed} | {mode} | {run['wall_s'] or 0:.0f} | {run['cpu_s'] or 0:.0f} | "
                             f"{run.get('torch_threads')} |")
    parts += ["", f"Machine: {doc['meta'].get('machine', 'unknown')}.", ""]
    (out / "gradualdiff_study.md").write_text("\n".join(parts), encoding="utf-8")


def update_readme(readme: Path, doc: dict[str, Any]) -> None:
    replace_block(readme, MARK_START, MARK_END, readme_block(doc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedllm.studies.gradualdiff", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/gradualdiff_study", help="folder for the .md/.json/.png")
    parser.add_argument("--runs", default="runs/gradualdiff_study", help="folder for the run directories")
    parser.add_argument("--quick", action="store_true", help="the tiny model, 2 rounds (smoke test, CI)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--local-seeds", default="0", help="seeds that also run local-only training (default 0)")
    parser.add_argument("--spread-partition", action="append", choices=sorted(PARTITIONS),
                        help="partitions whose other seeds run (federated and centralized); default iid")
    parser.add_argument("--partition", action="append", choices=sorted(PARTITIONS),
                        help="only this partition (repeatable); default both")
    parser.add_argument("--part", action="append", type=parse_part, default=[],
                        help="run only PARTITION:SEED:MODE (repeatable), e.g. iid:0:federated")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the finished parts")
    parser.add_argument("--readme", help="also replace the gradualdiff-study block of this Markdown page (docs/results/gradualdiff.md)")
    args = parser.parse_args(argv)
    quiet_process()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    local_seeds = [int(s) for s in args.local_seeds.split(",") if s.strip()]
    everything = plan(args.partition or list(PARTITIONS), seeds, local_seeds, args.spread_partition or ["iid"])
    runs = Path(args.runs)
    if not args.report_only:
        todo = args.part or everything
        run_parts(todo, runs, args.quick)
        for partition, seed in dict.fromkeys((p, s) for p, s, _ in todo):
            score_examples(runs, partition, seed, args.quick)
    cmd = "python -m fedllm.studies.gradualdiff --out " + args.out + (" --quick" if args.quick else "")
    doc = {"meta": {"command": cmd, "quick": args.quick, "setup": setup_line(args.quick), "machine": machine_line(),
                    "planned_parts": [list(p) for p in everything], "paper": PAPER},
           "results": collect(runs, everything, args.quick)}
    doc["paired"] = paired(doc["results"])
    write_report(doc, Path(args.out))
    if args.readme:
        update_readme(Path(args.readme), doc)
    done = sum(mode in runs for seeds_ in doc["results"].values() for runs in seeds_.values() for mode in MODES)
    print(f"wrote {args.out}/gradualdiff_study.md (.json, .png): {done} of {len(everything)} parts finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
