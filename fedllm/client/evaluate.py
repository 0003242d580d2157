"""Held-out evaluation of a causal LM: response-token NLL, perplexity and BLEU.

- ``eval_loss`` is the mean negative log-likelihood over all response tokens of the eval split
  (token-weighted, not a mean of per-batch means), and ``perplexity = exp(eval_loss)``.
- BLEU is sacrebleu's corpus BLEU of greedy generations for the first N eval prompts against
  their references; the (prompt, reference, prediction) triples are returned for the run files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sacrebleu
import torch
import torch.nn.functional as F

from fedllm.data.text import IGNORE, Example, collate


@dataclass(frozen=True)
class EvalResult:
    eval_loss: float
    perplexity: float
    bleu: float | None
    samples: list[dict]
    accuracy: float | None = None  # classifiers only


@torch.no_grad()
def response_nll(model, examples: list[Example], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Sum of response-token NLL and the number of response tokens."""
    total, count = 0.0, 0
    device = next(p for p in model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                              ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((labels != IGNORE).sum())
    return total, count


@torch.no_grad()
def generate(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of each example's prompt (left-padded batches)."""
    device = next(p for p in model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[str] = []
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
    return [s.strip() for s in out]


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def evaluate(model, tokenizer, examples: list[Example], batch_size: int, bleu_samples: int,
             max_new_tokens: int) -> EvalResult:
    """Loss/perplexity on every eval example; BLEU on the first ``bleu_samples`` of them."""
    was_training = model.training
    model.eval()
    try:
        total, count = response_nll(model, examples, tokenizer.pad_token_id, batch_size)
        loss = total / max(count, 1)
        samples, bleu = [], None
        if bleu_samples > 0:
            chosen = examples[:bleu_samples]
            preds = generate(model, tokenizer, chosen, max_new_tokens, batch_size)
            samples = [{"id": e.index, "prompt": e.prompt, "reference": e.reference, "prediction": p}
                       for e, p in zip(chosen, preds)]
            bleu = corpus_bleu(preds, [e.reference for e in chosen])
    finally:
        model.train(was_training)
    return EvalResult(eval_loss=loss, perplexity=math.exp(min(loss, 700.0)), bleu=bleu, samples=samples)
