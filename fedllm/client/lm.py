"""The client: a LightningModule for causal-LM LoRA training, and a callback that makes one
Lightning ``fit`` one client's federated round (load the global adapter, train, return Δ).

One model object per process serves every client: the callback swaps only the trainable state.
"""

from __future__ import annotations

import contextlib
import math

import lightning as L
import torch
from torch.utils.data import DataLoader

from fedllm.client.fit import add_grad_term
from fedllm.config import TrainConfig
from fedllm.data.text import Example, collate
from fedllm.models.lean_lora import lean_lora
from fedllm.models.precision import base_compute, fast_dropout, resolve_head_positions, train_dtype
from fedllm.models.quant import check_exact_kernels
from fedllm.models.state import TrainableState
from fedllm.types import StateDict, subtract


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then constant (HF's ``warmup_ratio`` semantics over a client's steps)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def round_schedule(kind: str, rnd: int, rounds: int, step: int, steps: int) -> float:
    """``train.schedule``: the learning-rate factor at a client's ``step`` (0-based) of round ``rnd``.

    The position is the global step g = (rnd − 1)·steps + step of T = rounds·steps: ``constant`` 1,
    ``linear`` 1 − g/T, ``cosine`` (1 + cos(π g/T)) / 2 — every client of a round at the same
    point of the run's decay, whatever the round's other clients do.
    """
    if kind == "constant":
        return 1.0
    g, total = (rnd - 1) * steps + step, max(1, rounds * steps)
    if kind == "linear":
        return max(0.0, 1.0 - g / total)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(g, total) / total))
    raise ValueError(f"unknown schedule {kind!r}")


IGNORE_INDEX = -100  # HF's label for "no loss here" (prompt and padding tokens)


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], labeled_only: bool = False) -> torch.Tensor:
    """The mean next-token cross-entropy over the labelled positions of ``batch``.

    ``labeled_only=False`` is HF's ``model(**batch).loss`` itself (logits at every position). With
    ``labeled_only=True`` the decoder runs as before but the LM head (for SmolLM2 a 576 x 49152
    matmul per position) runs only on the positions whose shifted label is not -100, and the
    cross-entropy is taken in fp32 with HF's reduction (the mean over those positions): the same
    loss up to float rounding (tests/test_fast_path.py states the tolerance), less work wherever
    prompts or padding carry no label. Shared by every LM client loop (sequential and fused).
    """
    if not labeled_only:
        return model(**batch).loss
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep], ignore_index=IGNORE_INDEX)


class CausalLMModule(L.LightningModule):
    """Trains the (shared, peft-wrapped) model's trainable parameters with ``train.optimizer``.

    AdamW (``auto``'s choice for language models) or SGD with ``train.momentum``; either with
    ``train.weight_decay`` and the linear warm-up over the first ``warmup_ratio`` of the steps.

    The same module serves the federated, centralized and local modes, so a comparison of the
    three differs only in orchestration.
    """

    def __init__(self, model: torch.nn.Module, state: TrainableState, train: TrainConfig, total_steps: int,
                 grad_term=None, rnd: int = 1, rounds: int = 1) -> None:
        super().__init__()
        self.model = model
        self.state = state
        self.train_cfg = train
        self.total_steps, self.rnd, self.rounds = total_steps, rnd, rounds
        self.warmup_steps = math.ceil(train.warmup_ratio * total_steps)
        self.grad_term = grad_term  # e.g. FedProx's μ(θ − θ_g): f(named params) -> {name: tensor}
        self.losses: list[float] = []
        self.labeled_only = resolve_head_positions(train.head_positions, train.precision) == "labeled"
        self._compute = contextlib.ExitStack()  # the base's bf16 compute for this fit (precision: bf16)

    def on_fit_start(self) -> None:
        check_exact_kernels(self.model)  # a packed 4-bit layer has no backward: never train on one
        self._compute.enter_context(base_compute(self.model, train_dtype(self.train_cfg.precision)))
        bf16 = self.train_cfg.precision == "bf16"
        self._compute.enter_context(fast_dropout(self.model, bf16))
        # on a CPU, plain LoRA layers train as one function over a bf16 copy of their base (lean_lora)
        self._compute.enter_context(lean_lora(self.model, bf16 and self.device.type == "cpu"))

    def on_fit_end(self) -> None:
        self._compute.close()  # back to the loaded compute dtype: evaluation stays exact

    def on_exception(self, exception: BaseException) -> None:
        self._compute.close()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = causal_lm_loss(self.model, batch, self.labeled_only)
        self.losses.append(float(loss.detach()))
        return loss

    def on_after_backward(self) -> None:
        add_grad_term(self.state.params, self.grad_term)

    def configure_optimizers(self):
        t = self.train_cfg
        params = [p for p in self.state.parameters() if p.requires_grad]
        if t.optimizer_for("lm") == "sgd":
            opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(  # constant's factor is exactly 1.0: x * 1.0 == x, bit for bit
            opt, lambda s: warmup_factor(s, self.warmup_steps) * round_schedule(t.schedule, self.rnd, self.rounds, s,
                                                                                 self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StopOnNonFinite(L.Callback):
    """Stops a client's fit at the first NaN/Inf loss (its update is then left out of the round)."""

    def __init__(self) -> None:
        self.tripped = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.losses and not math.isfinite(pl_module.losses[-1]):
            self.tripped = True
            trainer.should_stop = True


class FederatedRoundCallback(StopOnNonFinite):
    """Client side of one round: load the global state at fit start, compute Δ at fit end."""

    def __init__(self, global_state: StateDict) -> None:
        super().__init__()
        self.global_state = global_state
        self.delta: StateDict | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.state.set(self.global_state)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.delta = subtract(pl_module.state.get(), self.global_state)


class LengthBuckets(torch.utils.data.Sampler):
    """``train.length_bucketing``: seeded batches of similar length (less padding per batch).

    Each pass shuffles the examples (seeded), cuts the order into pools of ``pool`` batches, sorts
    each pool by length (stable) and cuts it into batches, then shuffles the batch order, so every
    example is still seen once a pass and a batch's examples are no longer an iid draw. The
    length-grouped sampler of HF's Trainer (``group_by_length``) does the same with mega-batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, pool: int, seed: int) -> None:
        self.lengths, self.batch_size, self.pool = lengths, batch_size, pool
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.gen).tolist()
        size, batches = self.pool * self.batch_size, []
        for i in range(0, len(order), size):
            chunk = sorted(order[i:i + size], key=lambda j: self.lengths[j])
            batches += [chunk[k:k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        for b in torch.randperm(len(batches), generator=self.gen).tolist():
            yield batches[b]


def make_loader(examples: list[Example], batch_size: int, pad_id: int, seed: int, bucketing: int = 0) -> DataLoader:
    """A seeded, shuffling loader (same seed -> same batch order on every run); ``bucketing`` > 0
    groups examples of similar length (:class:`LengthBuckets`, pools of that many batches)."""
    if bucketing > 0:
        sampler = LengthBuckets([len(e.input_ids) for e in examples], batch_size, bucketing, seed)
        return DataLoader(examples, batch_sampler=sampler, collate_fn=lambda b: collate(b, pad_id), num_workers=0)
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(examples, batch_size=batch_size, shuffle=True, generator=gen,
                      collate_fn=lambda b: collate(b, pad_id), num_workers=0)


# ------------------------------------------------------------------ sample-level DP-SGD (Opacus)

def empty_batch() -> dict[str, torch.Tensor]:
    """What a Poisson draw that picked no example collates to (the step is then noise only)."""
    zeros = torch.zeros((0, 1), dtype=torch.long)
    return {"input_ids": zeros, "attention_mask": zeros.clone(), "labels": zeros.clone()}


class PoissonBatches(torch.utils.data.Sampler):
    """Poisson sampling for DP-SGD: each step takes every example independently with probability q.

    ``ceil(1/q)`` batches an epoch (opacus' convention); the draws are seeded, so a round's batches
    are the same on every run. This is the sampling the accountant assumes (opacus' RDP, Poisson).
    """

    def __init__(self, n: int, q: float, seed: int) -> None:
        self.n, self.q = n, q
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return max(1, math.ceil(1 / self.q))

    def __iter__(self):
        for _ in range(len(self)):
            yield torch.nonzero(torch.rand(self.n, generator=self.gen) < self.q).flatten().tolist()


def make_poisson_loader(examples: list[Example], expected_batch: int, pad_id: int, seed: int) -> DataLoader:
    q = min(1.0, expected_batch / max(len(examples), 1))
    return DataLoader(examples, batch_sampler=PoissonBatches(len(examples), q, seed), num_workers=0,
                      collate_fn=lambda b: collate(b, pad_id) if b else empty_batch())


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's mean next-token cross-entropy over its labelled tokens (0 when it has none)."""
    shift, target = logits[:, :-1].float(), labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1),
                                            ignore_index=-100, reduction="none").view(target.shape)
    count = (target != -100).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1)


class DPSGDLMModule(CausalLMModule):
    """DP-SGD for the LoRA factors (Abadi et al., 2016): per-example gradients by Opacus' hooks on the
    trainable ``nn.Linear`` factors (the frozen NF4 base has none), each clipped to C in L2 over all
    factors, summed, plus N(0, σ²C²), divided by the expected batch size; Poisson batches
    (:class:`PoissonBatches`). The optimizer then steps on that gradient (``train.optimizer``)."""

    def __init__(self, model: torch.nn.Module, state: TrainableState, train: TrainConfig, total_steps: int,
                 noise: float, clip: float, expected_batch: int, seed: int, rnd: int = 1, rounds: int = 1) -> None:
        super().__init__(model, state, train, total_steps, rnd=rnd, rounds=rounds)
        from opacus import GradSampleModule  # noqa: PLC0415

        self.noise, self.clip, self.expected_batch = noise, clip, expected_batch
        self.noise_gen = torch.Generator().manual_seed(seed)
        self.raw_grad_steps = 0  # steps whose per-example gradients were non-zero (before the noise)
        self.gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample gradients: the model is shared by every client."""
        self.gsm._close()  # noqa: SLF001

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        params = [p for p in self.state.parameters() if p.requires_grad]
        if batch["input_ids"].shape[0] == 0:  # nobody drawn: a zero gradient, then noise only
            self.losses.append(0.0)
            return sum(p.sum() * 0.0 for p in params)
        losses = per_example_loss(self.gsm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"])
        self.losses.append(float(losses.mean().detach()))
        return losses.sum()

    @torch.no_grad()
    def on_after_backward(self) -> None:
        params = [p for p in self.state.parameters() if p.requires_grad]
        samples = [getattr(p, "grad_sample", None) for p in params]
        if any(s is not None for s in samples):
            n = next(s for s in samples if s is not None).shape[0]
            flat = [s.reshape(n, -1) if s is not None else torch.zeros(n, 0) for s in samples]
            norms = torch.cat(flat, dim=1).norm(dim=1)
            scale = (self.clip / (norms + 1e-6)).clamp(max=1.0)
            summed = [torch.einsum("n,n...->...", scale, s) if s is not None else torch.zeros_like(p)
                      for p, s in zip(params, samples)]
            self.raw_grad_steps += int(bool(norms.gt(0).any()))
        else:
            summed = [torch.zeros_like(p) for p in params]
        for p, g in zip(params, summed):
            noise = torch.randn(p.shape, generator=self.noise_gen, dtype=torch.float32) * (self.noise * self.clip)
            p.grad = ((g.float() + noise) / self.expected_batch).to(p.dtype)
            p.grad_sample = None
