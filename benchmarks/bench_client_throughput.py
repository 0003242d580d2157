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


def paired(label: str, sides: dict, repeats: int, tokens: int) -> dict[str, float]:
    """Best-of-``repeats`` tokens/s of each side, alternating which goes first."""
    best = {name: 0.0 for name in sides}
    order = list(sides)
    for rep in range(repeats):
        for name in order if rep % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            sides[name]()
            best[name] = max(best[name], tokens / (time.perf_counter() - t0))
    ratio = best["fedllm"] / best["plain"]
    print(f"{label:10s} plain {best['plain']:8.1f} tok/s   fedllm {best['fedllm']:8.1f} tok/s   "
          f"ratio {ratio:.3f}  ({'meets' if ratio >= 0.95 else 'MISSES'} >= 0.95)", flush=True)
    return {**best, "ratio": ratio}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="the tiny in-process llama instead of SmolLM2 in NF4")
    ap.add_argument("--steps", type=int, default=6, help="client optimizer steps per timed fit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eval-examples", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler breakdown of one demo round")
    ap.add_argument("--rows", type=int, default=18, help="profiler table rows")
    args = ap.parse_args()
    quiet()
    if args.profile:
        profile(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
