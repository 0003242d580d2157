"""Peak memory of client training with and without ``train.gradient_checkpointing`` (and with
``train.grad_accum`` halving the batch), SmolLM2-135M in NF4 + LoRA on every linear layer.

Each configuration runs in a fresh subprocess: load the model, reset the kernel's peak-RSS mark
(``/proc/self/clear_refs``), train a few steps through ``LMExperiment.fit`` on the client's
longest examples, and report the peak RSS above the post-load RSS (what training itself adds:
activations, gradients, optimizer state) and the time per step. The subprocesses run with glibc's
mmap threshold pinned at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): by default glibc raises it after
large frees, so freed activations stay in the heap and the peak RSS stops tracking live tensors.
The bytes autograd keeps for backward (a saved-tensors hook over one batch) are reported too:
they are what checkpointing trades for recomputation, independent of the allocator. The ratio of the
checkpointed to the plain run's training peak is printed.

    python benchmarks/bench_train_memory.py [--tiny] [--steps 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time

from _common import ROOT, quiet

STUDY = ROOT / "recipes" / "studies" / "gradualdiff.yaml"
CONFIGS = {
    "plain": [],
    "gradient_checkpointing": ["train.gradient_checkpointing=true"],
    "half batch x grad_accum 2": ["train.grad_accum=2"],
}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one(name: str, tiny: bool, steps: int, batch: int) -> dict:
    quiet()
    from fedllm.config import load_recipe  # noqa: PLC0415
    from fedllm.experiments.lm import LMExperiment  # noqa: PLC0415

    extra = ["model.preset=tiny", "model.quantization=none"] if tiny else []
    size = batch // 2 if "grad_accum" in name else batch
    recipe = load_recipe(STUDY, [*extra, *CONFIGS[name], f"train.batch_size={size}", "data.eval_size=8",
                                 "data.max_length=128"])
    exp = LMExperiment(recipe)
    examples = sorted(exp.data.client_examples(0), key=lambda e: -len(e.input_ids))[:steps * batch]
    gc.collect()
    _reset_peak()
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    exp.fit(0, examples, exp.initial_state, 1, steps)
    per_step = (time.perf_counter() - t0) / steps
    peak = _status_mb("VmHWM")
    saved = _saved_for_backward_mb(exp, examples[:size])  # after the peak is read: it allocates too
    return {"config": name, "rss_after_load_mb": base, "peak_mb": peak, "training_peak_mb": peak - base,
            "s_per_step": per_step, "saved_for_backward_mb": saved}


def _saved_for_backward_mb(exp, examples) -> float:
    """MB of tensors autograd keeps from one training forward of one batch (the activations that
    checkpointing trades for recomputation), counted by a saved-tensors hook: exact, unlike RSS."""
    import torch  # noqa: PLC0415

    from fedllm.data.text import collate  # noqa: PLC0415

    batch = collate(examples, exp.tokenizer.pad_token_id)
    seen: dict[int, int] = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()  # a tensor saved twice is stored once
        return t

    exp.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = exp.model(**batch).loss
    loss.backward()
    exp.model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8, help="examples per optimizer step (longest examples first)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.tiny, args.steps, args.batch)))
        return
    results = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch", str(args.batch)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # see the module docstring
        out = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True, text=True, check=True,
                             env=env)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:28s} RSS after load {r['rss_after_load_mb']:7.0f} MB   peak {r['peak_mb']:7.0f} MB   "
              f"training adds {r['training_peak_mb']:6.0f} MB   autograd keeps {r['saved_for_backward_mb']:6.0f} MB "
              f"per batch   {r['s_per_step']:.2f} s/step", flush=True)
    plain, ckpt = results["plain"], results["gradient_checkpointing"]
    print(f"gradient checkpointing: autograd keeps {ckpt['saved_for_backward_mb'] / plain['saved_for_backward_mb']:.2f} "
          f"x plain; training peak RSS {ckpt['training_peak_mb'] / plain['training_peak_mb']:.2f} x plain, "
          f"time per step {ckpt['s_per_step'] / plain['s_per_step']:.2f} x plain ({args.batch} longest examples per step)")


if __name__ == "__main__":
    main()
