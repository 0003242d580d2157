"""Cloned knowledge distillation for causal LMs: a LoRA core taught by LoRA edges (``workload: lm``).

The LM form of the paper's Algorithm 1 (see :mod:`fedllm.edge.vision`), on one frozen base model
per process whose LoRA adapter is swapped in place (:class:`fedllm.models.state.TrainableState`):

  Phase 0  the core adapter trains on the core examples D_c (response-token cross-entropy).
  per edge e (in the stream of :meth:`EdgeSchedule.from_recipe`: arrival order, lag, never-return):
    downlink  a clone of the core adapter (``teacher_init: clone``), or a fresh adapter from another
              seed (``independent``: lora_A redrawn, lora_B = 0, i.e. the base model), optionally
              first trained on D_c (``independent_pretrained``);
    Phase 1   the edge trains it on its own examples for ``edges.steps`` (n copies with an ensemble);
  on each return:
    Phase 2   the adapter joins the temporal memory (last M edges) and the core trains on D_c with
              :func:`fedllm.algorithms.distill.distill_lm_step`: per response token
              CE + α·t²·mean_k KL(softmax(z_k/t) ‖ softmax(z_core/t)) over the vocabulary, the
              teachers' logits computed by loading each remembered adapter into the same model.

Data: the recipe's text data (:func:`fedllm.data.build.build_text_data`, its held-out split for
evaluation) partitioned into one client per edge; a seeded ``core.fraction`` of the training
examples (at least one) becomes D_c and is removed from the edges. Each returned edge yields a row:
the teacher's and the core's held-out eval loss (mean response-token NLL) and perplexity. A control,
``core_only``, trains the Phase-0 core on D_c for as many Phase-2 steps with no teacher (CE only), so
the gain of distillation is told apart from the gain of more steps on D_c.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch
from torch import nn

from fedllm.algorithms.distill import TeacherMemory, distill_lm_step
from fedllm.client.evaluate import response_nll
from fedllm.config import RecipeError
from fedllm.data.build import build_text_data
from fedllm.data.text import Example, collate
from fedllm.edge.recipe import EdgeRecipe
from fedllm.edge.vision import EdgeSchedule
from fedllm.models.llm import add_lora, load_base
from fedllm.models.state import TrainableState
from fedllm.types import StateDict


class LMEdgeLearning:
    """The shared model, the tokenized splits and the three phases for one LM edge recipe."""

    def __init__(self, recipe: EdgeRecipe) -> None:
        self.recipe, main = recipe, recipe.lm_recipe()
        self.seed = main.seed
        base, self.tokenizer = load_base(main.model, main.seed)
        self.model: nn.Module = add_lora(base, main.lora, main.seed)
        self.state = TrainableState(self.model)
        self.initial: StateDict = self.state.get()
        data = build_text_data(main, self.tokenizer)
        pool = [i for part in data.clients for i in part]
        n_core = max(1, round(recipe.core.fraction * len(pool)))
        core = set(np.random.default_rng([main.seed, 11]).choice(pool, n_core, replace=False).tolist())
        self.core: list[Example] = [data.examples[i] for i in sorted(core)]
        self.edges: list[list[Example]] = [[data.examples[i] for i in part if i not in core] for part in data.clients]
        self.eval: list[Example] = data.eval_examples
        empty = [k for k, part in enumerate(self.edges) if not part]
        if empty:
            raise RecipeError("edges.count", f"edges {empty} hold no examples after the core took {n_core}; "
                              "lower edges.count or core.fraction, or raise lm.data.max_examples")

    def _device(self) -> torch.device:
        return next(p for p in self.model.parameters()).device

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def train(self, start: StateDict, examples: list[Example], steps: int, seed: int,
              teachers: list[StateDict] | None = None) -> tuple[StateDict, float]:
        """AdamW from ``start`` on ``examples`` (CE, or the KD loss against ``teachers``); the trained
        adapter and the mean loss. Batches are drawn without replacement, reshuffled from ``seed``."""
        cfg, dcfg = self.recipe.train, self.recipe.distill
        self.state.set(start)
        opt = torch.optim.AdamW(self.state.parameters(), lr=cfg.lr, weight_decay=0.0)
        gen, order, losses = torch.Generator().manual_seed(seed), torch.empty(0, dtype=torch.long), []
        torch.manual_seed(seed)  # LoRA dropout masks
        pad, device = self.tokenizer.pad_token_id, self._device()
        for _ in range(steps):
            if order.numel() < min(cfg.batch_size, len(examples)):
                order = torch.cat([order, torch.randperm(len(examples), generator=gen)])
            idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx.tolist()], pad).items()}
            z = self._teacher_logits(teachers or [], batch)
            self.model.train()
            loss = distill_lm_step(self._logits(batch), z, batch, dcfg.temperature, dcfg.alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return self.state.get(), statistics.fmean(losses)

    @torch.no_grad()
    def _teacher_logits(self, teachers: list[StateDict], batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each teacher adapter loaded in turn into the shared model; the student's adapter restored."""
        if not teachers:
            return []
        student = self.state.get()
        self.model.eval()
        out = []
        for t in teachers:
            self.state.set(t)
            out.append(self._logits(batch))
        self.state.set(student)
        return out

    def eval_loss(self, state: StateDict) -> float:
        """Mean response-token NLL of ``state`` on the held-out split."""
        self.state.set(state)
        self.model.eval()
        total, count = response_nll(self.model, self.eval, self.tokenizer.pad_token_id, self.recipe.lm.eval_batch_size)
        return total / max(count, 1)

    def fresh_adapter(self, seed: int) -> StateDict:
        """An independently initialized adapter: lora_A redrawn like peft (Kaiming-uniform, a=√5), lora_B = 0."""
        gen = torch.Generator().manual_seed(seed)
        out = {}
        for k, v in self.initial.items():
            if "lora_A" in k:
                bound = 1.0 / math.sqrt(v.shape[1])  # kaiming_uniform_(a=√5) on a [r, in] matrix
                out[k] = (torch.rand(v.shape, generator=gen) * 2 - 1) * bound
            else:
                out[k] = torch.zeros_like(v) if "lora_B" in k else v.clone()
        return out

    def edge_start(self, edge: int, core_state: StateDict) -> StateDict:
        init = self.recipe.distill.teacher_init
        if init == "clone":
            return core_state
        fresh = self.fresh_adapter(_seed(self.seed, 2, edge))
        if init == "independent":
            return fresh
        return self.train(fresh, self.core, self.recipe.core.steps, _seed(self.seed, 3, edge))[0]


def _seed(*tags: int) -> int:
    return int(np.random.SeedSequence(list(tags)).generate_state(1)[0] % (2**31 - 1))


def run_edge_lm(recipe: EdgeRecipe, run: LMEdgeLearning | None = None) -> dict:
    """Phase 0, then the edge stream; the JSON-ready result with one row per returned edge."""
    t0 = time.perf_counter()
    run = run or LMEdgeLearning(recipe)
    e, d, schedule = recipe.edges, recipe.distill, EdgeSchedule.from_recipe(recipe)
    core, _ = run.train(run.initial, run.core, recipe.core.steps, _seed(run.seed, 0))
    core0 = core
    loss = run.eval_loss(core)
    result = {"model": recipe.lm.model.preset, "lora_r": recipe.lm.lora.r, "num_edges": e.count,
              "core_examples": len(run.core), "edge_examples": [len(x) for x in run.edges],
              "eval_examples": len(run.eval), "base": {"eval_loss": run.eval_loss(run.initial)},
              "core": {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))},
              "recipe": recipe.to_dict(), "rows": []}
    memory, pending = TeacherMemory(d.memory * d.ensemble), {}
    for step, kind, edge in schedule.events():
        if kind == "send":
            start = run.edge_start(edge, core)
            trained = [run.train(start, run.edges[edge], e.steps, _seed(run.seed, 1, edge, i))
                       for i in range(d.ensemble)]
            pending[edge] = (step, [s for s, _ in trained], statistics.fmean(x for _, x in trained))
            continue
        sent, states, edge_loss = pending.pop(edge)
        for s in states:
            memory.push(s)
        core, _ = run.train(core, run.core, d.steps, _seed(run.seed, 4, len(result["rows"])), memory.teachers())
        before, loss = loss, run.eval_loss(core)
        result["rows"].append({
            "position": len(result["rows"]) + 1, "edge": edge, "sent_at": sent, "returned_at": step,
            "lag": step - sent, "teachers": len(memory), "edge_train_loss": edge_loss,
            "teacher_loss": statistics.fmean(run.eval_loss(s) for s in states), "loss_before": before,
            "eval_loss": loss, "perplexity": math.exp(min(loss, 700.0)), "time_s": time.perf_counter() - t0})
    if result["rows"]:  # control: the Phase-0 core trained on D_c for as many steps, without teachers
        steps = d.steps * len(result["rows"])
        alone, _ = run.train(core0, run.core, steps, _seed(run.seed, 5))
        loss = run.eval_loss(alone)
        result["core_only"] = {"steps": steps, "eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    return result
