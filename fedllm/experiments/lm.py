"""An LM experiment: one base model per process, the tokenized data, and client training.

Built once and shared by the federated, centralized and local modes (``fedllm compare`` loads the
4-bit base a single time). Simulated clients differ only in the trainable state loaded into the
shared model and in the examples they train on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from pathlib import Path

import torch

from fedllm.algorithms.drift import DriftTerm
from fedllm.client.evaluate import EvalResult, evaluate, example_nll, meters_of
from fedllm.client.fit import FitStats, fit_module
from fedllm.client.lm import (
    CausalLMModule,
    DPSGDLMModule,
    FederatedRoundCallback,
    make_loader,
    make_poisson_loader,
)
from fedllm.config import Recipe, RecipeError
from fedllm.data.build import TextData, build_text_data
from fedllm.data.text import Example
from fedllm.experiments.base import ClientFault, FitJob, fit_each, round_seed
from fedllm.experiments.lm_ddp import RankJob, RankPool, check_devices
from fedllm.models.llm import add_lora, load_base, pick_device
from fedllm.models.precision import check_precision, precision_info
from fedllm.models.quant import kernel_info
from fedllm.models.state import TrainableState
from fedllm.models.targets import lora_info
from fedllm.types import ClientUpdate, StateDict, serialized_bytes

log = logging.getLogger(__name__)


class LMExperiment:
    """4-bit base + LoRA (:mod:`fedllm.models.llm`) trained through :class:`CausalLMModule`; dense (no mask)."""

    mask = None  # LoRA states are exchanged whole
    mask_bytes = 0
    uplink_on_site = False  # in-process: the server's Uplink plays every client's part

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self.accelerator = "gpu" if pick_device(recipe.model) == "cuda" else "cpu"
        if recipe.train.precision == "16-mixed" and self.accelerator != "gpu":
            raise RecipeError("train.precision", "16-mixed needs a CUDA device and this machine has none; "
                              "use 32 or bf16-mixed")
        check_precision(recipe.train.precision, pick_device(recipe.model))  # bf16 only on bf16 hardware
        check_devices(recipe.train.devices, self.accelerator)  # one core or GPU per training process
        self.ranks = RankPool(recipe, self.accelerator, type(self))  # train.devices > 1: helper ranks, from the first fit
        base, self.tokenizer = load_base(recipe.model, recipe.seed)
        self.model = add_lora(base, recipe.lora, recipe.seed)
        if recipe.train.gradient_checkpointing:  # activations recomputed in backward (train mode only)
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.state = TrainableState(self.model)
        self.initial_state: StateDict = self.state.get()
        if recipe.federation.lora_aggregation == "frozen_a":
            # A stays at its shared initialisation on every client (no gradient, so AdamW leaves it
            # untouched and ΔA ≡ 0): averaging B alone is then exactly the mean of the products B·A.
            for key, p in self.state.params.items():
                if ".lora_A" in key:
                    p.requires_grad_(False)
        self.data: TextData = build_text_data(recipe, self.tokenizer)
        self.step_callbacks: list = []  # e.g. progress bars; added by the caller
        self._dp_history: dict[int, list] = {}  # privacy.dpsgd: each client's (σ, q, steps) so far

    def fit(self, client_id: int, examples: list[Example], start: StateDict, rnd: int, steps: int,
            grad_term: DriftTerm | None = None) -> ClientUpdate:
        """Train from ``start`` for ``steps`` steps on ``examples``; return the update Δ.

        ``grad_term`` (a typed drift term: ``grad_term(params) -> {key: tensor}``), when given, is
        added to the gradients after each backward pass (FedProx's μ(θ − θ_g), SCAFFOLD's c − cᵢ).
        """
        if self.recipe.faults.fires(client_id, rnd, "error"):
            raise ClientFault(f"injected failure of client {client_id} in round {rnd}")
        seed = round_seed(self.recipe.seed, rnd)
        torch.manual_seed(seed)  # LoRA dropout masks
        round_cb = FederatedRoundCallback(start)
        metrics: dict[str, float] = {}
        if self.recipe.privacy.dpsgd:
            fitted, metrics["dpsgd_epsilon"] = self._fit_dpsgd(client_id, examples, steps, seed, round_cb, rnd)
        elif self.recipe.train.devices > 1:  # one fit on N processes (Lightning DDP), Δ from this one
            job = RankJob(examples, start, steps, seed, rnd, grad_term)
            fitted = self.ranks.fit(self, job, [round_cb, *self.step_callbacks])
        else:
            t = self.recipe.train
            loader = make_loader(examples, t.batch_size, self.tokenizer.pad_token_id, seed, t.length_bucketing)
            module = CausalLMModule(self.model, self.state, t, steps, grad_term, rnd=rnd,
                                    rounds=self.recipe.federation.rounds)
            fitted = fit_module(module, loader, steps, [round_cb, *self.step_callbacks], self.accelerator,
                                t.max_grad_norm, t.grad_accum, t.precision)
        losses, delta = fitted.losses, round_cb.delta
        if self.recipe.faults.fires(client_id, rnd, "nan"):
            delta = {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
        train_loss = statistics.fmean(losses) if losses and not round_cb.tripped else float("nan")
        steps_done = len(losses) // self.recipe.train.grad_accum  # optimizer steps; losses are per batch
        return ClientUpdate(client_id=client_id, delta=delta, num_examples=len(examples), local_steps=steps_done,
                            train_loss=train_loss, bytes_up=serialized_bytes(delta),
                            grad_steps=fitted.grad_steps, metrics=metrics)

    def fit_many(self, jobs: list[FitJob], rnd: int, on_client=None) -> list[ClientUpdate | Exception]:
        """A round's clients: one after another, or in one fused pass over the shared base
        (``federation.fused_clients``, :mod:`fedllm.experiments.lm_fused`); the same updates either way."""
        if self.recipe.federation.fused_clients:
            from fedllm.experiments.lm_fused import fused_fit_many  # noqa: PLC0415

            return fused_fit_many(self, jobs, rnd, on_client)
        return fit_each(self, jobs, rnd, on_client)

    def _fit_dpsgd(self, client_id: int, examples: list, steps: int, seed: int, round_cb,
                   rnd: int = 1) -> tuple[FitStats, float]:
        """``privacy.dpsgd``: Opacus per-example gradients of the LoRA factors, clipped and noised
        (:class:`~fedllm.client.lm.DPSGDLMModule`) on Poisson batches; (fit stats, this client's ε so far).

        ε is opacus' RDP for Poisson sampling at q = batch_size / examples over every step this
        client has taken in the run (its own history), at ``privacy.delta``.
        """
        from fedllm.algorithms.privacy import history_epsilon  # noqa: PLC0415

        p, t = self.recipe.privacy, self.recipe.train
        loader = make_poisson_loader(examples, t.batch_size, self.tokenizer.pad_token_id, seed)
        module = DPSGDLMModule(self.model, self.state, t, steps, p.dpsgd_noise, p.dpsgd_clip, t.batch_size,
                               seed * 7_919 + client_id, rnd=rnd, rounds=self.recipe.federation.rounds)
        try:  # no whole-gradient clipping on top: the per-example clip is the mechanism
            fitted = fit_module(module, loader, steps, [round_cb, *self.step_callbacks], self.accelerator, 0.0)
        finally:
            module.close()
        q = loader.batch_sampler.q
        history = self._dp_history.setdefault(client_id, [])
        history.append((p.dpsgd_noise, q, len(fitted.losses)))
        return FitStats(fitted.losses, module.raw_grad_steps), history_epsilon(history, p.delta)

    def evaluate(self, state: StateDict) -> EvalResult:
        """The held-out split's metrics; with ``data.validation_fraction`` also ``val_loss``, the same
        NLL on the validation split (no BLEU there: it only picks rounds and learning rates).
        The ``step_callbacks`` that are a :class:`~fedllm.client.evaluate.Meter` see its batches and prompts."""
        self.state.set(state)
        e = self.recipe.eval
        meter = meters_of(self.step_callbacks)
        res = evaluate(self.model, self.tokenizer, self.data.eval_examples, e.batch_size, e.bleu_samples,
                       e.max_new_tokens, meter)
        if self.data.val_idx:
            val = evaluate(self.model, self.tokenizer, self.data.validation_examples, e.batch_size, 0, 1, meter)
            res = dataclasses.replace(res, val_loss=val.eval_loss)
        return res

    def evaluate_clients(self, state: StateDict, clients: list[int] | None = None) -> dict[int, float]:
        """Eval loss of ``state`` on each client's own held-out slice (``eval.client_holdout``)."""
        if not self.data.client_eval:
            return {}
        self.state.set(state)
        e = self.recipe.eval
        ids = range(len(self.data.client_eval)) if clients is None else clients
        return {k: evaluate(self.model, self.tokenizer, self.data.client_eval_examples(k), e.batch_size, 0,
                            e.max_new_tokens, meters_of(self.step_callbacks)).eval_loss
                for k in ids if self.data.client_eval[k]}

    def loss_on(self, state: StateDict, examples: list[Example]) -> float:
        """Token-weighted mean NLL of ``state`` on ``examples`` (a client's training data: IFCA's cluster
        choice); eval mode, so LoRA dropout is off and the number depends on the state alone."""
        sums, counts = self._nll_of(state, examples)
        return math.fsum(sums) / max(sum(counts), 1)

    def example_losses(self, state: StateDict, examples: list[Example]) -> list[float]:
        """Per example: the mean response-token NLL of ``state`` (eval mode): the privacy audit's
        canary scores (:mod:`fedllm.federation.audit`)."""
        sums, counts = self._nll_of(state, examples)
        return [s / max(n, 1) for s, n in zip(sums, counts)]

    def _nll_of(self, state: StateDict, examples: list[Example]) -> tuple[list[float], list[int]]:
        """Per-example summed response-token NLL and token counts of ``state``, in eval mode."""
        self.state.set(state)
        was_training = self.model.training
        self.model.eval()
        try:
            return example_nll(self.model, examples, self.tokenizer.pad_token_id, self.recipe.eval.batch_size)
        finally:
            self.model.train(was_training)

    def payload_bytes(self, state: StateDict) -> int:
        """Bytes of one adapter state or delta on the wire (safetensors)."""
        return serialized_bytes(state)

    def save_adapter(self, state: StateDict, path: Path) -> None:
        """Save in peft's format: ``PeftModel.from_pretrained(base, path)`` loads it."""
        self.state.set(state)
        self.model.save_pretrained(str(path))

    def runtime_info(self) -> dict:
        """Versions, CPU flags, the 4-bit kernel the shared model runs on, and the numerics training and
        evaluation used (:func:`fedllm.models.precision.precision_info`)."""
        t = self.recipe.train
        return {**kernel_info(self.model), **precision_info(t.precision, t.head_positions, pick_device(self.recipe.model)),
                **lora_info(self.model)}
