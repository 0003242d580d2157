"""Held-out evaluation of a causal LM: response-token NLL, perplexity and BLEU.

- ``eval_loss`` is the mean negative log-likelihood over all response tokens of the eval split
  (token-weighted, not a mean of per-batch means), and ``perplexity = exp(eval_loss)``.
- ``eval_loss_se`` is its standard error over examples (:func:`loss_standard_error`).
- BLEU is sacrebleu's corpus BLEU of greedy generations for the first N eval prompts against
  their references; the (prompt, reference, prediction) triples are returned for the run files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import sacrebleu
import torch
import torch.nn.functional as F

from fedllm.data.text import IGNORE, Example, collate


@runtime_checkable
class Meter(Protocol):
    """Feedback on evaluation work for a progress bar (SmolLM2's round-0 evaluation takes minutes on
    a CPU): ``begin`` names a phase and how many units it has, ``advance`` counts finished ones.
    A meter only watches: no number a run writes depends on it."""

    def begin(self, phase: str, total: int) -> None: ...

    def advance(self, n: int = 1) -> None: ...


class _Meters:
    """Every :class:`Meter` among ``callbacks`` (e.g. an experiment's ``step_callbacks``), as one."""

    def __init__(self, callbacks: Iterable[object] = ()) -> None:
        self.meters = [c for c in callbacks if isinstance(c, Meter)]

    def begin(self, phase: str, total: int) -> None:
        for m in self.meters:
            m.begin(phase, total)

    def advance(self, n: int = 1) -> None:
        for m in self.meters:
            m.advance(n)


def meters_of(callbacks: Iterable[object] = ()) -> Meter:
    """One meter that tells every :class:`Meter` among ``callbacks`` (none: it does nothing)."""
    return _Meters(callbacks)


@dataclass(frozen=True)
class EvalResult:
    eval_loss: float
    perplexity: float
    bleu: float | None
    samples: list[dict]
    accuracy: float | None = None  # classifiers only
    eval_loss_se: float | None = None  # standard error of eval_loss over examples (language models)
    example_sums: list[float] | None = None  # per example: summed response-token NLL (eval split order)
    example_counts: list[int] | None = None  # per example: response tokens (the paired ratio's weights)
    val_loss: float | None = None  # data.validation_fraction: the same NLL on the validation split
    backdoor_success: float | None = None  # attack.kind backdoor: stamped non-target images put in the target class


@torch.no_grad()
def example_nll(model, examples: list[Example], pad_id: int, batch_size: int,
                meter: Meter | None = None) -> tuple[list[float], list[int]]:
    """Per example: the summed response-token NLL and the number of response tokens (input order).

    Two savings over scoring a batch naively, neither changing what is summed: examples are batched
    in length order (less padding), and the LM head runs only on the window of positions that
    predict a response token in some row of the batch (``logits_to_keep``), not on the prompts.
    ``meter`` hears of each scored batch.
    """
    sums, counts = [0.0] * len(examples), [0] * len(examples)
    device = next(p for p in model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), i))
    meter = meter or meters_of()
    meter.begin("loss batches", -(-len(order) // batch_size))
    for i in range(0, len(order), batch_size):
        rows = order[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[j] for j in rows], pad_id).items()}
        labels = batch["labels"][:, 1:]
        scored = (labels != IGNORE).any(0).nonzero()
        if len(scored) == 0:
            meter.advance()
            continue
        start = int(scored[0])  # first position whose next token is a response token, in any row
        window = torch.arange(start, labels.size(1), device=device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=window).logits.float()
        target = labels[:, start:]
        nll = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none").sum(1)
        for j, total, n in zip(rows, nll.tolist(), (target != IGNORE).sum(1).tolist()):
            sums[j], counts[j] = total, n
        meter.advance()
    return sums, counts


def response_nll(model, examples: list[Example], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Sum of response-token NLL and the number of response tokens."""
    sums, counts = example_nll(model, examples, pad_id, batch_size)
    return math.fsum(sums), sum(counts)


def loss_standard_error(sums: list[float], counts: list[int]) -> float | None:
    """Standard error of the token-weighted mean NLL ``Σ s_i / Σ n_i`` over examples (ratio estimator).

    The examples, not the tokens, are the independent draws (tokens of one answer are correlated),
    so this is the delta-method SE of a ratio of means; ``perplexity``'s relative SE is the same
    number to first order (d exp(L) / exp(L) = dL).
    """
    pairs = [(s, n) for s, n in zip(sums, counts) if n > 0]
    m = len(pairs)
    if m < 2:
        return None
    mean_n = sum(n for _, n in pairs) / m
    loss = math.fsum(s for s, _ in pairs) / (mean_n * m)
    var = math.fsum((s - loss * n) ** 2 for s, n in pairs) / (m * (m - 1))
    return math.sqrt(var) / mean_n


@torch.no_grad()
def generate(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int,
             meter: Meter | None = None) -> list[str]:
    """Greedy continuations of each example's prompt (left-padded batches); ``meter`` counts prompts."""
    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[str] = []
    meter = meter or meters_of()
    meter.begin("BLEU prompts", len(examples))
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        width = max(len(e.prompt_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(chunk):
            ids[j, width - len(e.prompt_ids):] = torch.tensor(e.prompt_ids)
            mask[j, width - len(e.prompt_ids):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, num_beams=1)
        out.extend(tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True))
        meter.advance(len(chunk))
    return [s.strip() for s in out]


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def evaluate(model, tokenizer, examples: list[Example], batch_size: int, bleu_samples: int,
             max_new_tokens: int, meter: Meter | None = None) -> EvalResult:
    """Loss/perplexity on every eval example; BLEU on the first ``bleu_samples`` of them
    (``meter``: loss batches, then BLEU prompts)."""
    was_training = model.training
    model.eval()
    try:
        sums, counts = example_nll(model, examples, tokenizer.pad_token_id, batch_size, meter)
        loss = math.fsum(sums) / max(sum(counts), 1)
        samples, bleu = [], None
        if bleu_samples > 0:
            chosen = examples[:bleu_samples]
            preds = generate(model, tokenizer, chosen, max_new_tokens, batch_size, meter)
            samples = [{"id": e.index, "prompt": e.prompt, "reference": e.reference, "prediction": p}
                       for e, p in zip(chosen, preds)]
            bleu = corpus_bleu(preds, [e.reference for e in chosen])
    finally:
        model.train(was_training)
    return EvalResult(eval_loss=loss, perplexity=math.exp(min(loss, 700.0)), bleu=bleu, samples=samples,
                      eval_loss_se=loss_standard_error(sums, counts), example_sums=sums, example_counts=counts)
