"""Tokens per second of fedllm's client against a plain transformers + peft loop, in one run.

Training: ``LMExperiment.fit`` (the Lightning module, its callbacks, the state swap in and the Δ
out) against :func:`_common.plain_client_fit` (the same model, the same seeded batches, AdamW with
the same warm-up, whole-gradient clipping). Both Δ are compared, so the two really did the same work.
Evaluation: ``LMExperiment.evaluate`` without BLEU (held-out response-token NLL) against a plain loop
that runs every eval batch, in order, through the model with full logits and sums the cross-entropy.
Tokens are the non-padding tokens of the batches each side consumed (the same for both). The order
of the two sides alternates from one repetition to the next; the best repetition of each is kept.

    python benchmarks/bench_client_throughput.py [--tiny] [--steps 6] [--repeats 3] [--eval-examples 64]
    python benchmarks/bench_client_throughput.py --profile       # torch.profiler table of one demo round
    python benchmarks/bench_client_throughput.py --bf16          # train.precision bf16 vs the exact path
    python benchmarks/bench_client_throughput.py --bf16 --profile --steps 2   # profiler tables of both

Targets: fedllm >= 0.95 x the plain loop's tokens/s, for training and for evaluation.
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import ROOT, plain_client_fit, quiet

STUDY = ROOT / "recipes" / "studies" / "gradualdiff.yaml"


def trained_tokens(exp, examples, rnd: int, steps: int) -> int:
    from fedllm.client.lm import make_loader  # noqa: PLC0415
    from fedllm.experiments.base import round_seed  # noqa: PLC0415

    loader = make_loader(examples, exp.recipe.train.batch_size, exp.tokenizer.pad_token_id,
                         round_seed(exp.recipe.seed, rnd))
    batches = itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)
    return sum(int(b["attention_mask"].sum()) for b in batches)


@torch.no_grad()
def plain_eval(exp, examples, batch_size: int) -> tuple[float, int]:
    """Every batch in input order, logits at every position, summed response-token cross-entropy."""
    from fedllm.data.text import IGNORE, collate  # noqa: PLC0415

    exp.model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = collate(examples[i:i + batch_size], exp.tokenizer.pad_token_id)
        logits = exp.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        labels = b["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    exp.model.train()
    return total, count


def fedllm_eval(exp, examples, batch_size: int) -> tuple[float, int]:
    from fedllm.client.evaluate import response_nll  # noqa: PLC0415

    exp.model.eval()
    out = response_nll(exp.model, examples, exp.tokenizer.pad_token_id, batch_size)
    exp.model.train()
    return out


def paired(label: str, sides: dict, repeats: int, tokens: int, target: float = 0.95) -> dict[str, float]:
    """Best-of-``repeats`` tokens/s of each side, alternating which goes first; ratio = second / first."""
    best = {name: 0.0 for name in sides}
    order = list(sides)
    for rep in range(repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            sides[name]()
            best[name] = max(best[name], tokens / (time.perf_counter() - t0))
    (a, b), ratio = order, best[order[1]] / best[order[0]]
    print(f"{label:10s} {a} {best[a]:8.1f} tok/s   {b} {best[b]:8.1f} tok/s   "
          f"ratio {ratio:.3f}  ({'meets' if ratio >= target else 'MISSES'} >= {target})", flush=True)
    return {**best, "ratio": ratio}


def bf16_vs_exact(args) -> None:
    """``train.precision: bf16`` against the exact fp32 path on the study recipe: one model, the same
    seeded batches, order alternated; the relative difference of the two Δ is printed beside the ratio."""
    import dataclasses  # noqa: PLC0415

    from fedllm.config import load_recipe  # noqa: PLC0415
    from fedllm.experiments.lm import LMExperiment  # noqa: PLC0415
    from fedllm.models.precision import check_precision  # noqa: PLC0415

    extra = ["model.preset=tiny"] if args.tiny else []
    exp = LMExperiment(load_recipe(STUDY, [*extra, "federation.rounds=1", "data.eval_size=16", *args.set]))
    exact = exp.recipe
    fast = dataclasses.replace(exact, train=dataclasses.replace(exact.train, precision="bf16"))
    check_precision("bf16", "cuda" if exp.accelerator == "gpu" else "cpu")
    examples, start = exp.data.client_examples(0), exp.initial_state

    def fit(recipe):
        exp.recipe = recipe
        return exp.fit(0, examples, start, 1, args.steps)

    tokens = trained_tokens(exp, examples, 1, args.steps)
    print(f"{exact.model.preset} ({exact.model.quantization}), LoRA r {exact.lora.r} on "
          f"{len(exact.lora.target_modules)} modules; {args.steps} steps of batch {exact.train.batch_size} "
          f"= {tokens} tokens; torch threads {torch.get_num_threads()}", flush=True)
    a, b = fit(exact), fit(fast)  # warm-up of both, and the Δ difference
    num = sum(float((a.delta[k] - b.delta[k]).norm() ** 2) for k in a.delta) ** 0.5
    den = sum(float(v.norm() ** 2) for v in a.delta.values()) ** 0.5
    print(f"Δ: ||Δ_bf16 − Δ_exact|| / ||Δ_exact|| = {num / den:.3e}; train loss exact {a.train_loss:.5f} "
          f"bf16 {b.train_loss:.5f}", flush=True)
    paired("training", {"exact": lambda: fit(exact), "bf16": lambda: fit(fast)}, args.repeats, tokens, target=2.0)
    exp.recipe = exact


def throughput(args) -> None:
    from fedllm.config import load_recipe  # noqa: PLC0415
    from fedllm.experiments.lm import LMExperiment  # noqa: PLC0415

    extra = ["model.preset=tiny", "model.quantization=none"] if args.tiny else []
    exp = LMExperiment(load_recipe(STUDY, [*extra, "federation.rounds=1", f"data.eval_size={args.eval_examples}"]))
    examples, start = exp.data.client_examples(0), exp.initial_state
    tokens = trained_tokens(exp, examples, 1, args.steps)
    print(f"{exp.recipe.model.preset} ({exp.recipe.model.quantization}), LoRA r {exp.recipe.lora.r} on "
          f"{len(exp.recipe.lora.target_modules)} modules; {args.steps} steps of batch {exp.recipe.train.batch_size} "
          f"= {tokens} tokens; torch threads {torch.get_num_threads()}", flush=True)
    fed = exp.fit(0, examples, start, 1, args.steps).delta  # warm-up of both, and the same-work check
    plain = plain_client_fit(exp, examples, start, 1, args.steps)
    diff = max(float((fed[k] - plain[k]).abs().max()) for k in fed)
    size = max(float(v.abs().max()) for v in fed.values())
    print(f"same work: max |Δ_fedllm − Δ_plain| = {diff:.2e} (max |Δ| {size:.2e})", flush=True)
    paired("training", {"plain": lambda: plain_client_fit(exp, examples, start, 1, args.steps),
                        "fedllm": lambda: exp.fit(0, examples, start, 1, args.steps)}, args.repeats, tokens)
    ev, bs = exp.data.eval_examples, exp.recipe.eval.batch_size
    got, want = fedllm_eval(exp, ev, bs), plain_eval(exp, ev, bs)
    print(f"same work: eval NLL {got[0] / got[1]:.6f} (fedllm) vs {want[0] / want[1]:.6f} (plain), "
          f"{got[1]} response tokens each", flush=True)
    eval_tokens = sum(len(e.input_ids) for e in ev)
    paired("evaluation", {"plain": lambda: plain_eval(exp, ev, bs), "fedllm": lambda: fedllm_eval(exp, ev, bs)},
           args.repeats, eval_tokens)


def profile(args) -> None:
    """One federated round of the demo recipe (train, aggregate, evaluate) under torch.profiler."""
    from torch.profiler import ProfilerActivity  # noqa: PLC0415
    from torch.profiler import profile as torch_profile

    from fedllm.config import load_recipe  # noqa: PLC0415
    from fedllm.experiments.lm import LMExperiment  # noqa: PLC0415
    from fedllm.federation.modes import run_federated  # noqa: PLC0415

    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", ["federation.rounds=1", "output.plots=false",
                                                          "output.save_adapter=false"])
    exp = LMExperiment(recipe)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            run_federated(exp, out=out)
        wall = time.perf_counter() - t0
        rows = (Path(out) / recipe.name / "federated" / "metrics.jsonl").read_text().splitlines()
    last = json.loads(rows[-1])
    print(f"one demo round under the profiler: {wall:.1f} s wall (round 0 eval + round 1); round 1: train "
          f"{last['train_time_s']:.1f} s, aggregate {last['aggregate_time_s']:.2f} s, eval {last['eval_time_s']:.1f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def profile_steps(args) -> None:
    """``--profile --bf16``: torch.profiler tables of a study-recipe client fit, exact then bf16."""
    import dataclasses  # noqa: PLC0415

    from torch.profiler import ProfilerActivity  # noqa: PLC0415
    from torch.profiler import profile as torch_profile

    from fedllm.config import load_recipe  # noqa: PLC0415
    from fedllm.experiments.lm import LMExperiment  # noqa: PLC0415

    extra = ["model.preset=tiny"] if args.tiny else []
    exp = LMExperiment(load_recipe(STUDY, [*extra, "federation.rounds=1", "data.eval_size=16", *args.set]))
    examples, start, exact = exp.data.client_examples(0), exp.initial_state, exp.recipe
    for name in ("32", "bf16"):
        exp.recipe = dataclasses.replace(exact, train=dataclasses.replace(exact.train, precision=name))
        exp.fit(0, examples, start, 1, 1)  # warm-up
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            exp.fit(0, examples, start, 1, args.steps)
        print(f"--- precision {name}: {args.steps} steps", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)
    exp.recipe = exact


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the tiny in-process llama instead of SmolLM2 in NF4")
    ap.add_argument("--steps", type=int, default=6, help="client optimizer steps per timed fit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-examples", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler breakdown of one demo round")
    ap.add_argument("--bf16", action="store_true", help="train.precision bf16 vs the exact path (study recipe)")
    ap.add_argument("--set", nargs="*", default=[], help="recipe overrides for --bf16 (e.g. train.length_bucketing=8)")
    ap.add_argument("--rows", type=int, default=18, help="profiler table rows")
    args = ap.parse_args()
    quiet()
    if args.profile and args.bf16:
        profile_steps(args)
    elif args.profile:
        profile(args)
    elif args.bf16:
        bf16_vs_exact(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
