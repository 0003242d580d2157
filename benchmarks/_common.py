"""Shared set-up for the benchmarks: the demo recipe with overrides, and a quiet process."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401

    for name in ("lightning", "lightning.pytorch", "transformers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)


def demo_recipe(*overrides: str):
    from fedllm.config import load_recipe

    return load_recipe(ROOT / "recipes" / "demo.yaml", list(overrides))


def plain_client_fit(exp, examples, start, rnd: int, steps: int) -> dict:
    """What a hand-written transformers + peft loop does for one client round, on the experiment's own
    model and seeded batches: AdamW, the warm-up schedule, whole-gradient clipping; returns Δ."""
    import math  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from fedllm.client.lm import make_loader, warmup_factor  # noqa: PLC0415
    from fedllm.experiments.base import round_seed  # noqa: PLC0415

    cfg = exp.recipe.train
    exp.state.set(start)
    seed = round_seed(exp.recipe.seed, rnd)
    torch.manual_seed(seed)
    loader = make_loader(examples, cfg.batch_size, exp.tokenizer.pad_token_id, seed)
    params = [p for p in exp.state.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = math.ceil(cfg.warmup_ratio * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_factor(s, warm))
    exp.model.train()
    step, it = 0, iter(loader)
    while step < steps:
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        opt.zero_grad()  # before the backward: the shared model may hold an earlier fit's gradients
        loss = exp.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        step += 1
    new = exp.state.get()
    return {n: new[n] - start[n] for n in new}
