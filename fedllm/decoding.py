"""How ``fedllm chat`` and ``fedllm generate`` pick, stop and show an answer's tokens.

A first user's SmolLM2 chat printed nothing for minutes and then looped ("It is a type of
medication that is used as…" eight times): plain greedy decoding of a 135M model on a long answer
falls into such cycles. Decoding stays greedy (the same prompt always gets the same answer), with:

- a **repetition penalty** (CTRL, Keskar et al. 2019, §4.1: the logit of a token already used is
  divided by ``repetition_penalty`` when positive, multiplied when negative) and
- **no repeated n-gram** (Paulus et al. 2018, §2.5: a token that would complete an n-gram already in
  the answer is banned),

both over the *answer's* tokens only (:class:`AnswerOnly`): the question's own words, the system
prompt and the template's markup stay free to use, which transformers' processors, applied to the
whole sequence, would penalize too. Generation stops at the tokenizer's end of turn
(:func:`stop_ids`), and :class:`TextSink` hands the text to the terminal as it is generated.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TextStreamer,
)

from fedllm.config import RecipeError

END = re.compile(r"end|eot", re.IGNORECASE)  # names of end-of-text / end-of-turn special tokens


@dataclass(frozen=True)
class Decoding:
    """Greedy decoding with loop guards; ``repetition_penalty`` 1 and ``no_repeat_ngram_size`` 0 turn
    them off (plain greedy, as ``fedllm generate`` was before)."""

    max_new_tokens: int = 128
    repetition_penalty: float = 1.15  # CTRL used 1.2; a little gentler, as the n-gram ban also guards
    no_repeat_ngram_size: int = 4  # a looped clause repeats long n-grams; 4 also stops short cycles

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise RecipeError("--max-new-tokens", f"expected a positive integer, got {self.max_new_tokens}")
        if not self.repetition_penalty >= 1.0:
            raise RecipeError("--repetition-penalty", f"expected a number >= 1 (1: off), got {self.repetition_penalty}")
        if self.no_repeat_ngram_size < 0:
            raise RecipeError("--no-repeat-ngram", f"expected an integer >= 0 (0: off), got {self.no_repeat_ngram_size}")

    @staticmethod
    def of(decoding: Decoding | int) -> Decoding:
        """``decoding`` itself, or for an int that many new tokens with the default guards."""
        return decoding if isinstance(decoding, Decoding) else Decoding(max_new_tokens=decoding)

    def processors(self, prompt_len: int) -> LogitsProcessorList:
        """The logits processors for an answer that starts after ``prompt_len`` tokens."""
        out = LogitsProcessorList()
        if self.repetition_penalty > 1.0:
            out.append(AnswerOnly(RepetitionPenaltyLogitsProcessor(self.repetition_penalty), prompt_len))
        if self.no_repeat_ngram_size > 0:
            out.append(AnswerOnly(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size), prompt_len))
        return out


class AnswerOnly:
    """A transformers logits processor that sees only the generated tokens (after ``prompt_len``)."""

    def __init__(self, inner, prompt_len: int) -> None:
        self.inner, self.prompt_len = inner, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = input_ids[:, self.prompt_len:]
        if answer.shape[1] == 0:
            return scores
        return self.inner(answer, scores)


def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an answer: the tokenizer's and the model's eos, and every special token
    named like an end of text or turn (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``,
    ``<|endoftext|>``) or written by the chat template (a new ``<|im_start|>`` turn is not part of
    this answer either)."""
    ids: set[int] = set()
    for eos in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    for token in tokenizer.all_special_tokens:
        if END.search(token) or (template and token in template):
            tid = tokenizer.convert_tokens_to_ids(token)  # SmolLM2's unk is <|endoftext|>: an end too
            if isinstance(tid, int):
                ids.add(tid)
    return sorted(ids)


class TextSink(TextStreamer):
    """A transformers streamer that hands the answer's text to ``write`` as it is decoded (whole
    words: ``TextStreamer`` holds a word back until it is complete), without the prompt, the special
    tokens or the leading whitespace; ``first_text_at`` is when the first text went out."""

    def __init__(self, tokenizer, write: Callable[[str], None]) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write = write
        self.first_text_at: float | None = None

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.first_text_at is None:
            text = text.lstrip()
            if not text:
                return
            self.first_text_at = time.perf_counter()
        self.write(text)
