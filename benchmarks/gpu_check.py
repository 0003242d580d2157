"""GPU check: the tiny recipe and one SmolLM2 round on CUDA, with the shared base kept on the GPU.

    python benchmarks/gpu_check.py            # < 5 minutes on one GPU; prints "skipped" without CUDA

For each of the two runs it asserts that every parameter of the shared model is on the GPU before
and after the run and that nothing moved or cast the model during it (every ``Module._apply`` on
a module holding a shared parameter is recorded, which is what ``.to``/``.cpu``/``.cuda`` go
through), and prints the median optimizer-step time, the peak GPU memory, the compute dtype and
the round-0 and final perplexity. Exit 0 when every check holds, 1 when one fails.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import _common


def _steps_timer():
    import lightning as L
    import torch

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            torch.cuda.synchronize()
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


def main() -> int:
    import torch

    _common.quiet()
    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device here (torch.cuda.is_available() is False)")
        return 0
    from fedllm.config import load_recipe

    runs = {
        "tiny": load_recipe(_common.ROOT / "recipes" / "tiny.yaml", ["model.device=cuda", "eval.bleu_samples=2"]),
        "smollm2 (1 round, 3 clients x 4 steps)": _common.demo_recipe(
            "model.device=cuda", "federation.rounds=1", "eval.bleu_samples=2", "checkpoint.enabled=false"),
    }
    failures = [f for name, recipe in runs.items() for f in check(name, recipe)]
    for f in failures:
        print(f"gpu_check: FAILED: {f}")
    if not failures:
        print("gpu_check: ok: the shared base stayed on the GPU and training lowered eval loss in every run")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
