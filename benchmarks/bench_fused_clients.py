"""A round of K clients trained in one fused pass (``federation.fused_clients``) against one after another.

Both sides train the same K clients (client i of the partition, its own examples, the same start
state and steps) on the same built model: sequential is ``fit_each`` (one Lightning fit per client,
what every round does by default), fused is ``fused_fit_many`` (one forward and backward of the
shared 4-bit base per step over the clients' concatenated batches). The order of the two sides
alternates over repeats; a warm-up round of each comes first, untimed. Every repeat compares each
client's Δ between the two sides (‖Δ_fused − Δ_seq‖ / ‖Δ_seq‖; the maximum is reported). Tokens are
the non-padding tokens of the batches the clients consumed (the same on both sides). Peak RSS is
measured in a fresh child process per side (build the experiment, one round, ``ru_maxrss``), so one
side's allocations never count against the other.

    python benchmarks/bench_fused_clients.py            # K = 5 SmolLM2 clients, recipes/studies/gradualdiff.yaml
    python benchmarks/bench_fused_clients.py --tiny     # the tiny llama, seconds
    python benchmarks/bench_fused_clients.py --k 5 --steps 2 --repeats 3 --no-rss
    python benchmarks/bench_fused_clients.py --gemm       # one base GEMM over K batches vs K GEMMs, fp32 and bf16

``time_round(exp_or_recipe, k, fused)`` is importable (``benchmarks/gpu_check.py`` times fused vs
sequential on a GPU with it). Target on the 2-core CPU: fused >= 1.3x sequential.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time

import torch
from _common import ROOT, quiet

STUDY = ROOT / "recipes" / "studies" / "gradualdiff.yaml"
TINY = ROOT / "recipes" / "tiny.yaml"


def _experiment(exp_or_recipe):
    from fedllm.config import Recipe  # noqa: PLC0415
    from fedllm.experiments.lm import LMExperiment  # noqa: PLC0415

    return LMExperiment(exp_or_recipe) if isinstance(exp_or_recipe, Recipe) else exp_or_recipe


def jobs_for(exp, k: int, steps: int | None = None) -> list:
    """K jobs: client i trains on the partition's client ``i mod num_clients`` from the initial state."""
    from fedllm.experiments.base import FitJob  # noqa: PLC0415

    n, steps = exp.recipe.partition.num_clients, steps or exp.recipe.train.local_steps
    return [FitJob(i, exp.data.client_examples(i % n), exp.initial_state, steps) for i in range(k)]


def _sync(exp) -> None:
    if exp.accelerator == "gpu":
        torch.cuda.synchronize()


def time_round(exp_or_recipe, k: int, fused: bool, steps: int | None = None, rnd: int = 1,
               ) -> tuple[float, list[dict[str, torch.Tensor]]]:
    """(seconds, each client's Δ) of one round of ``k`` clients, fused or one after another.

    ``exp_or_recipe``: a built :class:`~fedllm.experiments.lm.LMExperiment` or a recipe to build one
    from (the build is not timed). A client that fails raises.
    """
    from fedllm.experiments.base import fit_each  # noqa: PLC0415
    from fedllm.experiments.lm_fused import fused_fit_many  # noqa: PLC0415

    exp = _experiment(exp_or_recipe)
    jobs = jobs_for(exp, k, steps)
    _sync(exp)
    t0 = time.perf_counter()
    out = fused_fit_many(exp, jobs, rnd) if fused else fit_each(exp, jobs, rnd)
    _sync(exp)
    seconds = time.perf_counter() - t0
    for upd in out:
        if isinstance(upd, Exception):
            raise upd
    return seconds, [upd.delta for upd in out]


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[key] - b[key]).double().norm() ** 2) for key in a) ** 0.5
    den = sum(float(a[key].double().norm() ** 2) for key in a) ** 0.5
    return num / den if den else num


def round_tokens(exp, k: int, steps: int | None = None, rnd: int = 1) -> int:
    """Non-padding tokens of the batches the round's clients consume (each client's seeded loader)."""
    from fedllm.client.lm import make_loader  # noqa: PLC0415
    from fedllm.experiments.base import round_seed  # noqa: PLC0415

    total, t = 0, exp.recipe.train
    for job in jobs_for(exp, k, steps):
        loader = make_loader(job.examples, t.batch_size, exp.tokenizer.pad_token_id, round_seed(exp.recipe.seed, rnd))
        batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), job.steps * t.grad_accum)
        total += sum(int(b["attention_mask"].sum()) for b in batches)
    return total


def recipe_for(tiny: bool, overrides: list[str] | None = None):
    from fedllm.config import load_recipe  # noqa: PLC0415

    if tiny:
        return load_recipe(TINY, ["partition.num_clients=5", "lora.dropout=0.1", "eval.bleu_samples=0",
                                  *(overrides or [])])
    return load_recipe(STUDY, ["eval.bleu_samples=0", *(overrides or [])])


def measure(args) -> dict:
    exp = _experiment(recipe_for(args.tiny, args.set))
    sides = ["sequential", "fused"]
    for side in sides:  # warm-up (first-call costs), untimed
        time_round(exp, args.k, side == "fused", 1)
    times: dict[str, list[float]] = {side: [] for side in sides}
    worst: dict[str, float] = {side: 0.0 for side in sides[1:]}
    for rep in range(args.repeats):
        deltas = {}
        for side in sides if rep % 2 == 0 else sides[::-1]:
            seconds, deltas[side] = time_round(exp, args.k, side == "fused", args.steps)
            times[side].append(seconds)
        for side in sides[1:]:
            worst[side] = max(worst[side], *(rel_diff(s, f) for s, f in zip(deltas["sequential"], deltas[side])))
    tokens = round_tokens(exp, args.k, args.steps)
    best = {side: min(v) for side, v in times.items()}
    return {"model": "tiny" if args.tiny else "smollm2-135m (recipes/studies/gradualdiff.yaml)", "k": args.k,
            "steps": args.steps or exp.recipe.train.local_steps, "tokens_per_round": tokens,
            "seconds": times, "tokens_per_s": {side: tokens / s for side, s in best.items()},
            "speedup_best": {side: best["sequential"] / best[side] for side in sides[1:]},
            "speedup_median": {side: _median(times["sequential"]) / _median(times[side]) for side in sides[1:]},
            "max_rel_delta_diff": worst}


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def rss_child(args) -> None:
    """In a fresh process: build, one round of one side; print RSS figures (MB) as JSON.

    ``process_peak_mb`` is the process's high-water mark (``ru_maxrss``: the model load's peak
    counts too); ``round_peak_mb`` is the high-water mark of the round alone (``VmHWM`` after the
    kernel's mark is reset to the current RSS through ``/proc/self/clear_refs``), beside the RSS the
    round started from (``before_round_mb``).
    """
    import gc  # noqa: PLC0415

    exp = _experiment(recipe_for(args.tiny, args.set))
    gc.collect()
    before = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    seconds, _ = time_round(exp, args.k, args.rss_child == "fused", args.steps)
    print(json.dumps({"side": args.rss_child, "before_round_mb": round(before, 1),
                      "round_peak_mb": round(_status_mb("VmHWM"), 1),
                      "process_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "round_s": round(seconds, 2)}))


def peak_rss(args) -> dict:
    out = {}
    for side in ("sequential", "fused"):
        cmd = [sys.executable, __file__, "--rss-child", side, "--k", str(args.k)]
        cmd += (["--tiny"] if args.tiny else []) + (["--steps", str(args.steps)] if args.steps else [])
        cmd += ["--set", *args.set] if args.set else []
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def gemm_scaling(k: int, repeats: int) -> None:
    """``--gemm``: what a fused step's one base GEMM over K batches' rows saves against K GEMMs over one
    batch's rows each, for SmolLM2's three base shapes (batch 4 x 128 = 512 rows), fp32 and bf16.

    The base matmuls are most of a step; a fused step can only be faster on them if one GEMM over more
    rows is cheaper than the same rows in K calls. Best of ``repeats`` x 10 calls, the two sides alternated.
    """
    f = torch.nn.functional
    for dtype in (torch.float32, torch.bfloat16):
        for n_in, n_out in ((576, 1536), (1536, 576), (576, 576)):
            w, one = torch.randn(n_out, n_in).to(dtype), torch.randn(512, n_in).to(dtype)
            many = torch.randn(512 * k, n_in).to(dtype)
            sides = {"k_calls": lambda w=w, one=one: [f.linear(one, w) for _ in range(k)],
                     "one_call": lambda w=w, many=many: f.linear(many, w)}
            best = {name: float("inf") for name in sides}
            for rep in range(repeats):
                for name in sides if rep % 2 == 0 else list(sides)[::-1]:
                    sides[name]()  # warm
                    t0 = time.perf_counter()
                    for _ in range(10):
                        sides[name]()
                    best[name] = min(best[name], (time.perf_counter() - t0) / 10)
            print(json.dumps({"dtype": str(dtype).removeprefix("torch."), "weight": [n_out, n_in], "k": k,
                              "k_calls_ms": round(best["k_calls"] * 1e3, 2), "one_call_ms": round(best["one_call"] * 1e3, 2),
                              "fused_speedup": round(best["k_calls"] / best["one_call"], 3)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gemm", action="store_true", help="only the base-GEMM scaling: K calls of 512 rows vs one of K x 512")
    ap.add_argument("--tiny", action="store_true", help="the tiny llama instead of SmolLM2")
    ap.add_argument("--k", type=int, default=5, help="clients in the round")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per client (default: the recipe's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child processes")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="recipe overrides for both sides, e.g. train.head_positions=labeled")
    ap.add_argument("--rss-child", choices=("sequential", "fused"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    quiet()
    if args.rss_child:
        rss_child(args)
        return
    if args.gemm:
        gemm_scaling(args.k, args.repeats)
        return
    result = measure(args)
    if not args.no_rss:
        result["peak_rss"] = peak_rss(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
