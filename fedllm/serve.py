"""Ask a trained run questions: ``fedllm generate`` (batch, JSONL out) and ``fedllm chat`` (a REPL).

Both load the model the way the run did (:func:`fedllm.models.llm.load_base`, then peft's
``PeftModel.from_pretrained`` on ``RUN_DIR/adapter``), build each prompt with the run's own
tokenizer chat template and the recipe's ``data.system_prompt`` (as training did), and decode
greedily, so the same prompt always gets the same answer.
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
from fedllm.export import open_run

Message = dict[str, str]


def load_run_model(run_dir: str | Path):
    """``(recipe, model, tokenizer)``: the run's base as it trained it, with its final adapter."""
    from peft import PeftModel

    from fedllm.models.llm import load_base

    recipe, adapter = open_run(run_dir)
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


@torch.no_grad()
def respond(model, tokenizer, messages: list[Message], max_new_tokens: int, template: str = "chat") -> str:
    """The greedy answer to the conversation's last user message (prompted as the run was trained)."""
    ids = prompt_token_ids(tokenizer, messages, template)
    limit = _context_limit(model)
    if limit is not None and len(ids) + max_new_tokens > limit:
        ids = ids[-max(limit - max_new_tokens, 1):]  # keep the end: the question and the assistant tag
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


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


def answer_all(recipe: Recipe, model, tokenizer, prompts: list[str], max_new_tokens: int,
               on_answer: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """One ``{"prompt", "response"}`` per prompt, each answered on its own (no shared history)."""
    rows = []
    for p in prompts:
        rows.append({"prompt": p, "response": respond(model, tokenizer, conversation(recipe, [], p), max_new_tokens,
                                                      recipe.data.template)})
        if on_answer:
            on_answer()
    return rows


def generate_command(run_dir: str, prompts: list[str] | None, file: str | None, out: str | None,
                     max_new_tokens: int) -> int:
    """``fedllm generate``: answers as JSONL, to ``out`` or stdout."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    recipe, _ = open_run(run_dir)  # bad paths fail before the model loads
    questions = list(prompts or []) + (read_prompts(file, recipe.data.prompt_field) if file else [])
    recipe, model, tokenizer = load_run_model(run_dir)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("generating", total=len(questions))
        rows = answer_all(recipe, model, tokenizer, questions, max_new_tokens,
                          lambda: progress.advance(task))
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if out is None:
        sys.stdout.write(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        print(f"{len(rows)} answers: {out}", file=sys.stderr)
    return 0


def _fit_history(recipe: Recipe, tokenizer, history: list[Message], prompt: str, limit: int | None,
                 max_new_tokens: int) -> list[Message]:
    """Drop the oldest exchanges until the conversation and the answer fit the model's context."""
    while history and limit is not None and \
            len(prompt_token_ids(tokenizer, conversation(recipe, history, prompt), recipe.data.template)) \
            + max_new_tokens > limit:
        history = history[2:]
    return history


def chat_loop(recipe: Recipe, model, tokenizer, lines: Iterable[str], write: Callable[[str], None],
              max_new_tokens: int) -> int:
    """Answer each line, keeping the conversation; ``/reset`` forgets it, ``/exit`` (or the end of
    ``lines``) stops. Returns the number of answers. A run trained with a single-turn
    ``data.template`` (alpaca or a template string) answers each line on its own."""
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
        history = _fit_history(recipe, tokenizer, history, text, _context_limit(model), max_new_tokens)
        answer = respond(model, tokenizer, conversation(recipe, history, text), max_new_tokens, recipe.data.template)
        if recipe.data.template == "chat":
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        write(f"assistant> {answer}")
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


def chat_command(run_dir: str, max_new_tokens: int, stdin: TextIO | None = None) -> int:
    """``fedllm chat``: a REPL on stdin; exits on end of input or ``/exit``."""
    recipe, model, tokenizer = load_run_model(run_dir)
    print(f"fedllm chat: {recipe.name} ({run_dir}); greedy, up to {max_new_tokens} new tokens. "
          "/reset forgets the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    chat_loop(recipe, model, tokenizer, _stdin_lines(stdin or sys.stdin), lambda s: print(s, flush=True),
              max_new_tokens)
    return 0
