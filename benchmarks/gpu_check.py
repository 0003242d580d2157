"""GPU check, in one invocation of under 8 minutes that needs no file larger than the bitsandbytes wheel.

    python benchmarks/gpu_check.py            # one CUDA GPU; prints "skipped" without CUDA
    python benchmarks/gpu_check.py --smoke    # CPU, toy sizes: every part runs (what the test runs)

Parts, each printing one JSON line per figure (``"figure": ...``), then a verdict line:

1. ``moves``: the tiny recipe federated on CUDA; every parameter of the shared model stays on the GPU
   before, during and after the run (every ``Module._apply`` on a module holding a shared parameter is
   recorded), and training lowers eval loss. Needs the SmolLM2 tokenizer cache (``$FEDLLM_CACHE``,
   2 MB), not the model.
2. ``qlora_7b``: a model of Llama-2-7B's shape built in-process with random weights, NF4 + LoRA r 64 on
   all linear layers (:mod:`_qlora_shape`); fedllm's client step (``CausalLMModule`` through
   ``fit_module`` on the shared-model strategy) against a plain peft loop (AdamW, warm-up, clipping)
   on the same batches, order alternated; median step time and peak GPU memory of each. Targets:
   fedllm >= 0.95 x the plain loop's speed at <= 1.05 x its peak memory.
3. ``fused``: one round of K = 8 clients on a small llama (SmolLM2-135M's shape, random weights saved to a
   temporary ``model.path`` with SmolLM2's tokenizer, NF4 + LoRA r 16 on all linear layers), fused against
   sequential (``benchmarks/bench_fused_clients.time_round``), order alternated, per-client Δ compared
   (<= 1e-4 relative). Target >= 3 x.

What a lent GPU machine needs beside the working tree: the bitsandbytes, peft and lightning wheels
(``.whl``, carried) and fedllm's SmolLM2 tokenizer cache (``FEDLLM_CACHE``, 2 MB; parts 1 and 3) — no model
file: every model here is built from a config with random weights.

Exit 0 when every check holds, 1 when one fails.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import _common


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _steps_timer():
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _sync()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            _sync()
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def check(name: str, recipe) -> list[str]:
    """Run ``recipe`` federated on CUDA; return the failed checks (printing the figures)."""
    import torch

    from fedllm.client.strategy import recording_moves
    from fedllm.experiments import make_experiment
    from fedllm.federation.modes import run_federated
    from fedllm.models.quant import linear4bit_layers

    t0 = time.perf_counter()
    exp = make_experiment(recipe)
    load_s = time.perf_counter() - t0
    failures = []
    off = [n for n, p in exp.model.named_parameters() if p.device.type != "cuda"]
    if off:
        failures.append(f"{name}: {len(off)} parameters not on CUDA after loading, e.g. {off[0]}")
    timer = _steps_timer()
    exp.step_callbacks.append(timer)
    torch.cuda.reset_peak_memory_stats()
    with recording_moves(exp.model) as moved, tempfile.TemporaryDirectory() as out:
        t1 = time.perf_counter()
        summary = run_federated(exp, out=out)
        run_s = time.perf_counter() - t1
    if moved:
        failures.append(f"{name}: the shared model was moved or cast during the run by {sorted(set(moved))}")
    off = [n for n, p in exp.model.named_parameters() if p.device.type != "cuda"]
    if off:
        failures.append(f"{name}: {len(off)} parameters left CUDA during the run, e.g. {off[0]}")
    first, last = summary["initial"], summary["final"]
    if not last["eval_loss"] < first["eval_loss"]:
        failures.append(f"{name}: eval loss did not fall ({first['eval_loss']:.4f} -> {last['eval_loss']:.4f})")
    dtypes = sorted({str(layer.compute_dtype) for _, layer in linear4bit_layers(exp.model)})
    print(json.dumps({
        "run": name, "device": torch.cuda.get_device_name(0), "4bit_compute_dtype": dtypes,
        "load_s": round(load_s, 2), "run_s": round(run_s, 2),
        "median_step_s": round(statistics.median(timer.times), 4) if timer.times else None,
        "steps": len(timer.times), "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "perplexity_round0": round(first["perplexity"], 3), "perplexity_final": round(last["perplexity"], 3),
        "moves_during_run": len(moved)}))
    return failures


def _peak_reset() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def _plain_steps(model, batches: list[dict], train) -> list[float]:
    """A hand-written peft loop: AdamW, linear warm-up, whole-gradient clipping; each step's seconds."""
    import torch

    from fedllm.client.lm import warmup_factor

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    warm = max(1, round(train.warmup_ratio * len(batches)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, warm))
    device = next(p.device for p in params)
    model.train()
    times = []
    for batch in batches:
        _sync()
        t = time.perf_counter()
        batch = {k: v.to(device) for k, v in batch.items()}
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        opt.step()
        sched.step()
        _sync()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return times


def _fedllm_steps(model, batches: list[dict], train, accelerator: str) -> list[float]:
    """fedllm's client: ``CausalLMModule`` through ``fit_module`` (Lightning, shared-model strategy)."""
    from torch.utils.data import DataLoader

    from fedllm.client.fit import fit_module
    from fedllm.client.lm import CausalLMModule
    from fedllm.models.state import TrainableState

    timer = _steps_timer()
    module = CausalLMModule(model, TrainableState(model), train, len(batches))
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    fit_module(module, loader, len(batches), [timer], accelerator, train.max_grad_norm)
    return timer.times


def qlora_shape_check(shape: str, device: str, r: int, batch: int, seq: int, steps: int,
                      repeats: int) -> list[str]:
    """fedllm's client step vs a plain peft loop on a model of ``shape`` (NF4 + LoRA r on all linears)."""
    import torch
    from _qlora_shape import build_qlora, lora_params, nf4_bytes, random_batches

    from fedllm.config import load_recipe

    train = load_recipe(_common.ROOT / "recipes" / "tiny.yaml", ["train.lr=1e-4", "train.max_grad_norm=0.3"]).train
    t0 = time.perf_counter()
    model, config = build_qlora(shape, device, r)
    build_s = time.perf_counter() - t0
    batches = random_batches(config.vocab_size, steps, batch, seq)
    accelerator = "gpu" if device == "cuda" else "cpu"
    runs: dict[str, list[tuple[float, float | None]]] = {"plain": [], "fedllm": []}
    for rep in range(repeats):
        for side in (("plain", "fedllm") if rep % 2 == 0 else ("fedllm", "plain")):
            _peak_reset()
            times = (_plain_steps(model, batches, train) if side == "plain"
                     else _fedllm_steps(model, batches, train, accelerator))
            runs[side].append((statistics.median(times[2:] or times), _peak_mib()))
    step = {k: min(t for t, _ in v) for k, v in runs.items()}
    peak = {k: max((m for _, m in v if m is not None), default=None) for k, v in runs.items()}
    speed = step["plain"] / step["fedllm"]
    mem = peak["fedllm"] / peak["plain"] if peak["plain"] else None
    print(json.dumps({
        "figure": f"qlora_{shape}", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "lora_r": r, "batch": batch, "seq": seq, "steps": steps, "repeats": repeats,
        "lora_params": lora_params(model), "nf4_mib": round(nf4_bytes(model) / 2**20, 1), "build_s": round(build_s, 1),
        "fedllm_step_s": round(step["fedllm"], 4), "plain_step_s": round(step["plain"], 4),
        "tokens_per_s_fedllm": round(batch * seq / step["fedllm"], 1), "speed_vs_plain": round(speed, 3),
        "fedllm_peak_mib": peak["fedllm"], "plain_peak_mib": peak["plain"],
        "memory_vs_plain": round(mem, 3) if mem is not None else None}))
    del model
    _peak_reset()
    failures = []
    if device == "cuda" and speed < 0.95:
        failures.append(f"qlora_{shape}: fedllm's step is {speed:.3f} x the plain loop's speed (target >= 0.95)")
    if mem is not None and mem > 1.05:
        failures.append(f"qlora_{shape}: fedllm's peak memory is {mem:.3f} x the plain loop's (target <= 1.05)")
    return failures


def shaped_model_dir(shape: str, root) -> str:
    """A llama of ``shape`` with random weights, saved with SmolLM2's tokenizer (from fedllm's 2 MB cache)
    so a recipe's ``model.path`` loads it like any checkpoint (4-bit on load)."""
    from _qlora_shape import SHAPES
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedllm.models.llm import smollm2_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    dims = {**SHAPES[shape], "vocab_size": len(tok)}
    config = LlamaConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True, max_position_embeddings=2048, **dims)
    LlamaForCausalLM(config).save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


def fused_check(device: str, smoke: bool) -> list[str]:
    """One round of K clients fused vs sequential on a small llama (random weights, NF4 + LoRA on all
    linear layers), order alternated, per-client Δ compared (``bench_fused_clients.time_round``)."""
    from bench_fused_clients import rel_diff, round_tokens, time_round

    from fedllm.config import load_recipe
    from fedllm.experiments.lm import LMExperiment

    k, shape, steps, repeats = (3, "toy", 2, 2) if smoke else (8, "smollm2-135m", 4, 3)
    with tempfile.TemporaryDirectory() as root:
        recipe = load_recipe(_common.ROOT / "recipes" / "tiny.yaml", [
            f"model.path={shaped_model_dir(shape, root)}", f"model.device={device}", f"partition.num_clients={k}",
            "partition.method=iid", "lora.dropout=0.1", "lora.r=16",
            "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            "data.max_length=128", f"data.max_examples={40 * k}", "eval.bleu_samples=0"])
        exp = LMExperiment(recipe)
        time_round(exp, k, fused=True, steps=1)  # warm-up of both paths, untimed
        time_round(exp, k, fused=False, steps=1)
        times: dict[bool, list[float]] = {True: [], False: []}
        worst = 0.0
        for rep in range(repeats):
            got = {}
            for fused in ((True, False) if rep % 2 == 0 else (False, True)):
                seconds, got[fused] = time_round(exp, k, fused, steps)
                times[fused].append(seconds)
            worst = max(worst, *(rel_diff(s, f) for s, f in zip(got[False], got[True])))
        tokens = round_tokens(exp, k, steps)
    best = {side: min(v) for side, v in times.items()}
    speedup = best[False] / best[True]
    import torch

    print(json.dumps({
        "figure": f"fused_k{k}_{shape}", "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "clients": k, "steps": steps, "repeats": repeats, "tokens_per_round": tokens,
        "sequential_round_s": round(best[False], 3), "fused_round_s": round(best[True], 3),
        "fused_speedup": round(speedup, 3), "max_rel_delta_diff": float(f"{worst:.3g}")}))
    failures = []
    if worst > 1e-4:
        failures.append(f"fused: a client's Δ differs from its sequential fit by {worst:.2e} relative (> 1e-4)")
    if device == "cuda" and speedup < 3.0:
        failures.append(f"fused: K = {k} fused round is {speedup:.2f} x sequential (target >= 3)")
    return failures


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, toy sizes: every part runs (for tests)")
    p.add_argument("--parts", default="moves,qlora_7b,fused", help="comma-separated parts to run")
    args = p.parse_args(argv)
    _common.quiet()
    parts = set(args.parts.split(","))
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False)")
        return 0
    device = "cpu" if args.smoke else "cuda"
    failures: list[str] = []
    if "moves" in parts and not args.smoke:
        from fedllm.config import load_recipe

        recipe = load_recipe(_common.ROOT / "recipes" / "tiny.yaml", ["model.device=cuda", "eval.bleu_samples=2"])
        failures += check("tiny", recipe)
    if "qlora_7b" in parts:
        shape, r, batch, seq, steps = ("toy", 8, 2, 32, 4) if args.smoke else ("llama2-7b", 64, 4, 512, 10)
        failures += qlora_shape_check(shape, device, r, batch, seq, steps, repeats=2)
    if "fused" in parts:
        failures += fused_check(device, smoke=args.smoke)
    for f in failures:
        print(f"gpu_check: FAILED: {f}")
    if not failures:
        print(f"gpu_check: ok ({device}): every check held")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
