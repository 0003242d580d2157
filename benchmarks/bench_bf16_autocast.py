"""bf16 on a CPU with and without Lightning-style autocast, against the exact path, in one run.

The study recipe's SmolLM2 client 0: the same seeded batches of 4, forward + backward + AdamW, for
``exact`` (fp32), ``autocast`` (the NF4 base in bf16 and the rest under ``torch.autocast`` bf16: the
bf16 path until commit 1ea25e6) and ``nocast`` (the NF4 base in bf16, the rest fp32: the CPU bf16
path from 1ea25e6) and ``lean`` (``nocast`` with the LoRA layers on
:mod:`fedllm.models.lean_lora`: the CPU bf16 path now). The paths alternate in order from one repetition to the next; the best repetition of
each is printed. All three use the labelled-positions LM head except ``exact`` (as fedllm does).

    python benchmarks/bench_bf16_autocast.py [--paths exact,autocast,nocast,lean] [--repeats 3] [--batches 4]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time

from _common import ROOT, quiet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", default="exact,autocast,nocast,lean")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args()
    quiet()
    import torch  # noqa: PLC0415

    from fedllm.client.lm import causal_lm_loss, make_loader  # noqa: PLC0415
    from fedllm.config import load_recipe  # noqa: PLC0415
    from fedllm.experiments import make_experiment  # noqa: PLC0415
    from fedllm.models.lean_lora import lean_lora  # noqa: PLC0415
    from fedllm.models.precision import base_compute, fast_dropout  # noqa: PLC0415

    exp = make_experiment(load_recipe(ROOT / "recipes" / "studies" / "gradualdiff.yaml", []))
    model = exp.model
    model.train()
    loader = make_loader(exp.data.client_examples(0), 4, exp.tokenizer.pad_token_id, 0)
    batches = list(itertools.islice(iter(loader), args.batches))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)

    def run(path: str) -> float:
        with contextlib.ExitStack() as stack:
            if path != "exact":
                stack.enter_context(base_compute(model, torch.bfloat16))
                stack.enter_context(fast_dropout(model, True))
                stack.enter_context(lean_lora(model, path == "lean"))
            t0 = time.perf_counter()
            for b in batches:
                cast = torch.autocast("cpu", dtype=torch.bfloat16) if path == "autocast" else contextlib.nullcontext()
                with cast:
                    loss = causal_lm_loss(model, b, path != "exact")
                loss.backward()
                opt.step()
                opt.zero_grad()
            return tokens / (time.perf_counter() - t0)

    paths = args.paths.split(",")
    got: dict[str, list[float]] = {k: [] for k in paths}
    for rep in range(args.repeats):
        for path in paths if rep % 2 == 0 else paths[::-1]:
            got[path].append(run(path))
    for path in paths:
        print(f"{path:9s} best {max(got[path]):7.1f} tok/s  runs {', '.join(f'{x:.1f}' for x in got[path])}")


if __name__ == "__main__":
    main()
