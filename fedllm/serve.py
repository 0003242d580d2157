"""Ask a trained run questions: ``fedllm generate`` (batch, JSONL out) and ``fedllm chat`` (a REPL).

Both load the model the way the run did (:func:`fedllm.models.llm.load_base`, then peft's
``PeftModel.from_pretrained`` on ``RUN_DIR/adapter``), build each prompt with the run's own
tokenizer chat template and the recipe's ``data.system_prompt`` (as training did), and decode
greedily with loop guards (:mod:`fedllm.decoding`), so the same prompt always gets the same answer.
``chat`` prints each answer as it is generated.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import torch

from fedllm.config import Recipe, RecipeError
from fedllm.data.text import prompt_token_ids
from fedllm.decoding import Decoding, TextSink, stop_ids
from fedllm.export import open_run

Message = dict[str, str]


# --weights: which form of the run's model answers (the same weights either way)
WEIGHTS = {"nf4": "the run's 4-bit base with its adapter: the numeric path the run evaluated",
           "merged": "the run's NF4-rounded base dequantized to fp32, adapter merged (what `fedllm export "
                     "--merge` writes; logits within 1e-4 of nf4's): several times faster per token on a CPU"}


def load_run_model(run_dir: str | Path, weights: str = "nf4"):
    """``(recipe, model, tokenizer)``: the run's base as it trained it, with its final adapter
    (``weights="nf4"``), or those weights merged into one fp32 model (``"merged"``,
    :func:`fedllm.export.merged_model`). On a CPU bitsandbytes' exact 4-bit path dequantizes every
    weight at every step (:mod:`fedllm.models.quant`), which costs a chat more than the
    matmuls: the merged form does that once, at load."""
    from peft import PeftModel

    from fedllm.models.llm import load_base, load_tokenizer, model_dir, pick_device, user_files

    if weights not in WEIGHTS:
        raise RecipeError("--weights", f"expected one of {', '.join(WEIGHTS)}, got {weights!r}")
    recipe, adapter = open_run(run_dir)
    if weights == "merged":
        from fedllm.export import merged_model

        model = merged_model(recipe, adapter, "run")[0].to(pick_device(recipe.model))
        return recipe, model, load_tokenizer(model_dir(recipe.model, recipe.seed), user_files(recipe.model))
    base, tokenizer = load_base(recipe.model, recipe.seed)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return recipe, model, tokenizer


def conversation(recipe: Recipe, history: list[Message], prompt: str) -> list[Message]:
    """``[system?] + history + [user: prompt]``: the system prompt is the recipe's, as in training."""
    system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []
    return [*system, *history, {"role": "user", "content": prompt}]


def _context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def respond(model, tokenizer, messages: list[Message], decoding: Decoding | int, template: str = "chat",
            on_text: Callable[[str], None] | None = None) -> str:
    """The greedy answer to the conversation's last user message (prompted as the run was trained),
    with ``decoding``'s loop guards (an int: that many new tokens, default guards); ``on_text``
    receives the answer's text as it is generated."""
    ids = answer_ids(model, tokenizer, messages, decoding, template, on_text)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.no_grad()
def answer_ids(model, tokenizer, messages: list[Message], decoding: Decoding | int, template: str = "chat",
               on_text: Callable[[str], None] | None = None) -> list[int]:
    """The token ids :func:`respond` decodes (up to and including a stop token)."""
    d = Decoding.of(decoding)
    ids = prompt_token_ids(tokenizer, messages, template)
    limit = _context_limit(model)
    if limit is not None and len(ids) + d.max_new_tokens > limit:
        ids = ids[-max(limit - d.max_new_tokens, 1):]  # keep the end: the question and the assistant tag
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    # the guards are fedllm's answer-only processors: transformers' own (from the model's
    # generation_config) are set neutral so that they neither double nor clash with them
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         num_beams=1, max_new_tokens=d.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=stop_ids(tokenizer, model), repetition_penalty=1.0, no_repeat_ngram_size=0,
                         logits_processor=d.processors(len(ids)),
                         streamer=None if on_text is None else TextSink(tokenizer, on_text))
    return out[0, len(ids):].tolist()


def read_prompts(path: str | Path, prompt_field: str = "prompt") -> list[str]:
    """Prompts from a JSONL file: one JSON string, or one object with a ``prompt`` (or the
    recipe's ``data.prompt_field``) string, per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), "does not exist; expected a JSONL file of prompts")
    prompts = []
    fields = list(dict.fromkeys(("prompt", prompt_field)))
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{path}:{n}", f"not valid JSON ({exc.msg}); expected a string or "
                                  f"an object with a {fields[0]!r} string") from None
            if isinstance(row, dict):
                row = next((row[f] for f in fields if isinstance(row.get(f), str)), None)
            if not isinstance(row, str) or not row.strip():
                raise RecipeError(f"{path}:{n}", f"expected a non-empty string or an object with a "
                                  f"{' or '.join(map(repr, fields))} string")
            prompts.append(row)
    if not prompts:
        raise RecipeError(str(path), "holds no prompts; expected one per line")
    return prompts


def answer_all(recipe: Recipe, model, tokenizer, prompts: list[str], decoding: Decoding | int,
               on_answer: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """One ``{"prompt", "response"}`` per prompt, each answered on its own (no shared history)."""
    rows = []
    for p in prompts:
        rows.append({"prompt": p, "response": respond(model, tokenizer, conversation(recipe, [], p), decoding,
                                                      recipe.data.template)})
        if on_answer:
            on_answer()
    return rows


def generate_command(run_dir: str, prompts: list[str] | None, file: str | None, out: str | None,
                     decoding: Decoding | int, weights: str = "nf4") -> int:
    """``fedllm generate``: answers as JSONL, to ``out`` or stdout."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    recipe, _ = open_run(run_dir)  # bad paths fail before the model loads
    questions = list(prompts or []) + (read_prompts(file, recipe.data.prompt_field) if file else [])
    recipe, model, tokenizer = _load_showing(run_dir, "generate", weights)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("generating", total=len(questions))
        rows = answer_all(recipe, model, tokenizer, questions, decoding,
                          lambda: progress.advance(task))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is None:
        sys.stdout.write(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        print(f"{len(rows)} answers: {out}", file=sys.stderr)
    return 0


def _load_showing(run_dir: str, verb: str, weights: str):
    """:func:`load_run_model` behind a spinner on stderr (a terminal only), then one line saying how
    long it took and in which form: loading is the slow part of starting ``chat`` or ``generate``."""
    import time

    from rich.console import Console

    recipe, _ = open_run(run_dir)
    if weights not in WEIGHTS:
        raise RecipeError("--weights", f"expected one of {', '.join(WEIGHTS)}, got {weights!r}")
    t0 = time.perf_counter()
    with Console(stderr=True).status(f"fedllm {verb}: loading the {recipe.model.preset} base "
                                     f"({recipe.model.quantization}) and the run's adapter ({weights})"):
        loaded = load_run_model(run_dir, weights)
    print(f"fedllm {verb}: model loaded in {time.perf_counter() - t0:.1f} s ({weights}: {WEIGHTS[weights]})",
          file=sys.stderr)
    return loaded


def _fit_history(recipe: Recipe, tokenizer, history: list[Message], prompt: str, limit: int | None,
                 max_new_tokens: int) -> list[Message]:
    """Drop the oldest exchanges until the conversation and the answer fit the model's context."""
    while history and limit is not None and \
            len(prompt_token_ids(tokenizer, conversation(recipe, history, prompt), recipe.data.template)) \
            + max_new_tokens > limit:
        history = history[2:]
    return history


def chat_loop(recipe: Recipe, model, tokenizer, lines: Iterable[str], write: Callable[[str], None],
              decoding: Decoding | int, stream: Callable[[str], None] | None = None) -> int:
    """Answer each line, keeping the conversation; ``/reset`` forgets it, ``/exit`` (or the end of
    ``lines``) stops. Returns the number of answers. A run trained with a single-turn
    ``data.template`` (alpaca or a template string) answers each line on its own. Each answer goes
    to ``write`` as one ``assistant> ...`` line, or, with ``stream``, piece by piece as generated."""
    d = Decoding.of(decoding)
    history: list[Message] = []
    answered = 0
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            history.clear()
            write("(conversation cleared)")
            continue
        if not text:
            continue
        history = _fit_history(recipe, tokenizer, history, text, _context_limit(model), d.max_new_tokens)
        if stream is not None:
            stream("assistant> ")
        answer = respond(model, tokenizer, conversation(recipe, history, text), d, recipe.data.template, stream)
        if recipe.data.template == "chat":
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        if stream is None:
            write(f"assistant> {answer}")
        else:
            stream("\n")
        answered += 1
    return answered


def _stdin_lines(stdin: TextIO) -> Iterable[str]:
    if stdin.isatty():
        while True:
            try:
                yield input("you> ")
            except EOFError:
                print()
                return
    else:
        yield from stdin


def _print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat_command(run_dir: str, decoding: Decoding | int, stdin: TextIO | None = None, weights: str = "merged") -> int:
    """``fedllm chat``: a REPL on stdin, each answer printed as it is generated; exits on end of
    input or ``/exit``. It answers with the merged weights by default (:data:`WEIGHTS`): streaming
    is only as quick as each token."""
    d = Decoding.of(decoding)
    recipe, model, tokenizer = _load_showing(run_dir, "chat", weights)
    guards = (f"repetition penalty {d.repetition_penalty:g}, no repeated {d.no_repeat_ngram_size}-grams"
              if d.repetition_penalty > 1 or d.no_repeat_ngram_size else "no loop guards")
    print(f"fedllm chat: {recipe.name} ({run_dir}); greedy ({guards}), up to {d.max_new_tokens} new tokens. "
          "/reset forgets the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    chat_loop(recipe, model, tokenizer, _stdin_lines(stdin or sys.stdin), lambda s: print(s, flush=True),
              d, _print_now)
    return 0
