"""Time from a chat prompt to the first answer text printed, as ``fedllm chat`` does it.

    flock /tmp/fedllm-bench.lock .venv/bin/python benchmarks/chat_latency.py RUN_DIR [--repeats 1]

Loads the run's model the way ``fedllm chat`` does (:func:`fedllm.serve.load_run_model`: the run's
4-bit base and its adapter) and, for comparison, the same weights merged into a plain fp32 model
(:func:`fedllm.export.merged_model` over the run's NF4-rounded base, what ``fedllm export --merge``
writes). For each prompt, in alternating order, it times :func:`fedllm.serve.respond` with the chat
defaults (:class:`fedllm.decoding.Decoding`) from the call to the first text the streamer hands out
(what a user sees first) and to the end of the answer. The machine's load average is printed too:
the figures mean little on a busy machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

PROMPTS = ["What helps with anxiety?", "How can I sleep better?", "What is a panic attack?"]


def ask(recipe, model, tokenizer, prompt: str, decoding) -> tuple[float, float, int, str]:
    """(seconds to the first text, seconds to the whole answer, answer tokens, the answer)."""
    from fedllm.serve import answer_ids, conversation

    seen: list[float] = []
    start = time.perf_counter()
    ids = answer_ids(model, tokenizer, conversation(recipe, [], prompt), decoding, recipe.data.template,
                     on_text=lambda _t: seen.append(time.perf_counter()))
    end = time.perf_counter()
    return (seen[0] if seen else end) - start, end - start, len(ids), tokenizer.decode(ids, skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--repeats", type=int, default=1, help="times to ask each prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-merged", action="store_true", help="time only the 4-bit base + adapter")
    parser.add_argument("--no-nf4", action="store_true", help="time only the merged model")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from fedllm.decoding import Decoding
    from fedllm.export import merged_model, open_run
    from fedllm.serve import load_run_model

    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}")
    t0 = time.perf_counter()
    recipe, model, tokenizer = load_run_model(args.run_dir)
    models = {} if args.no_nf4 else {"nf4+adapter": model}
    print(f"nf4+adapter loaded in {time.perf_counter() - t0:.1f} s ({recipe.model.preset})")
    if not args.no_merged:
        t0 = time.perf_counter()
        models["merged fp32"] = merged_model(recipe, open_run(args.run_dir)[1], "run")[0]
        print(f"merged fp32 loaded in {time.perf_counter() - t0:.1f} s")
    decoding = Decoding(max_new_tokens=args.max_new_tokens)
    firsts: dict[str, list[float]] = {name: [] for name in models}
    rates: dict[str, list[float]] = {name: [] for name in models}
    turn = 0
    for _ in range(args.repeats):
        for prompt in PROMPTS:
            names = list(models) if turn % 2 == 0 else list(reversed(models))
            turn += 1
            for name in names:
                first, total, tokens, answer = ask(recipe, models[name], tokenizer, prompt, decoding)
                firsts[name].append(first)
                rates[name].append(tokens / total)
                print(f"{name}: first text {first:5.2f} s, answer {total:5.1f} s ({tokens} tokens, "
                      f"{tokens / total:.1f} tok/s): {prompt!r} -> {answer[:80]!r}", flush=True)
    for name in models:
        print(f"{name}: first text median {statistics.median(firsts[name]):.2f} s, max {max(firsts[name]):.2f} s; "
              f"median {statistics.median(rates[name]):.1f} tok/s over {len(firsts[name])} answers")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
