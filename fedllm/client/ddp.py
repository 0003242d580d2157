"""One client's fit across several processes: Lightning's DDP on the shared model (``train.devices``).

Every rank holds its own copy of the 4-bit base (loaded once per process) and trains the same
LoRA state on its shard of the client's batches; DDP all-reduces (averages) the LoRA gradients in
the backward pass, so gradient clipping, the drift term and AdamW then act on the same gradient on
every rank and the ranks stay in step (Li et al., 2020, "PyTorch Distributed: Experiences on
Accelerating Data Parallel Training", VLDB). What makes N ranks x batch B the same optimizer step
as one process with batch N·B:

- **Same big batches.** :func:`rank_loader` draws the big batches of N·B examples exactly as the
  one-process loader of :func:`~fedllm.client.lm.make_loader` does (same seed, same generator
  draws, length buckets included) and gives rank r the examples r, r+N, r+2N, ... of each, like
  ``DistributedSampler`` does with a whole epoch. A big batch with fewer than N examples (the last
  of an epoch) leaves some ranks empty: such a rank runs one example with no labelled token (a
  zero gradient that still takes part in the all-reduce).
- **Token-weighted loss.** HF's causal-LM loss is the mean over a batch's labelled tokens, and
  shards hold different token counts, so the mean of the ranks' means is not the big batch's mean.
  Each rank sums its token losses; one all-reduce of (sum, count) gives the big batch's count C,
  and the rank returns ``sum · N / C``: DDP's average over ranks is then Σ sum / C, the big batch's
  own loss gradient (what HF's Trainer does with ``num_items_in_batch``). The loss recorded is
  the big batch's mean on every rank.

LoRA dropout draws its masks per rank (:func:`rank_seed`), so with ``lora.dropout`` > 0 the result
is a different (equally valid) draw than one process makes; it matches only up to that noise.

The process group is the caller's (:mod:`fedllm.experiments.lm_ddp` makes one per fit, gloo on CPU,
NCCL on GPUs); :class:`SharedModelDDP` neither launches processes nor moves the shared model.
"""

from __future__ import annotations

import dataclasses
import warnings

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.environments import ClusterEnvironment
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from fedllm.client.fit import FitStats, GradWitness, lightning_precision
from fedllm.client.lm import IGNORE_INDEX, CausalLMModule, make_loader
from fedllm.client.strategy import _same_device
from fedllm.data.text import Example


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of rank ``rank`` (its LoRA dropout masks); rank 0 keeps the one-process seed."""
    return (seed + rank * 1_000_003) % (2**31 - 1)


# ------------------------------------------------------------------------------------ data


class _Shards(torch.utils.data.Sampler):
    """Rank ``rank``'s slice ``big[rank::world]`` of each big batch of ``batches``; an empty slice
    becomes ``[-1 - big[0]]``, which :class:`_RankExamples` serves without labels."""

    def __init__(self, batches, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for big in self.batches:
            yield list(big[self.rank::self.world]) or [-1 - big[0]]


class _RankExamples(torch.utils.data.Dataset):
    """The client's examples; index -1-i is example i with every label ignored (a weightless batch)."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        if i >= 0:
            return self.examples[i]
        e = self.examples[-1 - i]
        return dataclasses.replace(e, labels=[IGNORE_INDEX] * len(e.labels))


def rank_loader(examples: list[Example], batch_size: int, world: int, rank: int, pad_id: int, seed: int,
                bucketing: int = 0) -> DataLoader:
    """Rank ``rank``'s loader: its shard of the big batches (``world`` x ``batch_size`` examples) that
    ``make_loader`` would draw for one process. The generator is the big loader's own, so each pass
    makes the same draws (the DataLoader's base seed, then the permutation) in the same order."""
    big = make_loader(examples, world * batch_size, pad_id, seed, bucketing)
    return DataLoader(_RankExamples(examples), batch_sampler=_Shards(big.batch_sampler, rank, world),
                      generator=big.generator, collate_fn=big.collate_fn, num_workers=0)


# ------------------------------------------------------------------------------------ loss


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   labeled_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the next-token cross-entropies over the labelled positions, their count): HF's causal-LM
    loss before its division by the count (the LM head on every position, or only on the labelled
    ones with ``labeled_only``, as :func:`~fedllm.client.lm.causal_lm_loss`)."""
    target = batch["labels"][:, 1:]
    keep = target != IGNORE_INDEX
    if labeled_only:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
        total = torch.nn.functional.cross_entropy(logits.float(), target[keep], reduction="sum")
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        total = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                  ignore_index=IGNORE_INDEX, reduction="sum")
    return total, keep.sum()


class DDPCausalLMModule(CausalLMModule):
    """:class:`~fedllm.client.lm.CausalLMModule` whose loss is this rank's share of the big batch's
    token-mean loss (see the module docstring); it records the big batch's mean loss."""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, count = token_loss_sum(self.model, batch, self.labeled_only)
        both = torch.stack([total.detach().double(), count.double()])
        dist.all_reduce(both)  # the big batch's (sum, count) on every rank
        self.losses.append(float(both[0] / both[1]))
        return total * (dist.get_world_size() / both[1].to(total.dtype))


# ------------------------------------------------------------------------------------ strategy


class FixedRanks(ClusterEnvironment):
    """Ranks given by the caller, who started the processes and the process group."""

    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.rank, self.world = rank, world

    @property
    def creates_processes_externally(self) -> bool:
        return True  # Lightning launches nothing

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        return 0

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return self.world

    def set_world_size(self, size: int) -> None:
        pass

    def global_rank(self) -> int:
        return self.rank

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return self.rank

    def node_rank(self) -> int:
        return 0


class SharedModelDDP(DDPStrategy):
    """Lightning's DDP on the caller's process group, for a shared model that never moves.

    Like :class:`~fedllm.client.strategy.SharedModelStrategy` it checks that the model is already on
    this rank's device and leaves it there at teardown. The frozen base and the buffers are left out
    of DDP's start-up broadcast (every rank loaded the same base; only LoRA is synchronized), and the
    seed is not reset (each rank's dropout stream is the caller's :func:`rank_seed`).
    """

    strategy_name = "fedllm_shared_model_ddp"

    def __init__(self, rank: int, devices: list[torch.device]) -> None:
        super().__init__(parallel_devices=devices, cluster_environment=FixedRanks(rank, len(devices)),
                         broadcast_buffers=False)

    def _configure_launcher(self) -> None:
        self._launcher = None  # the caller started every rank (also from a notebook)

    def setup_distributed(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("SharedModelDDP trains on the caller's process group, and there is none")
        self.set_world_ranks()

    def model_to_device(self) -> None:
        assert self.model is not None, "the strategy has no model"
        for name, p in self.model.named_parameters():
            if not _same_device(p.device, self.root_device):
                raise RuntimeError(f"parameter {name} is on {p.device}, rank {self.global_rank} on {self.root_device}")

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        fixed = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, fixed)
        return super()._setup_model(model)

    def teardown(self) -> None:
        if isinstance(self.model, DistributedDataParallel):
            self.model = self.lightning_module  # unwrap; the reducer's hooks go with the wrapper
        assert self.accelerator is not None and self.cluster_environment is not None
        self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()


def fit_module_ddp(module: L.LightningModule, loader: DataLoader, steps: int, callbacks: list,
                   strategy: SharedModelDDP, max_grad_norm: float = 0.0, accumulate: int = 1,
                   precision: str = "32") -> FitStats:
    """:func:`~fedllm.client.fit.fit_module` on one rank of ``strategy``'s process group: the same
    quiet Trainer, with the rank's own loader (no sampler replaced) and clipping after the all-reduce."""
    module.losses = []
    witness = GradWitness()
    accelerator = "gpu" if strategy.parallel_devices[0].type == "cuda" else "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator=accelerator,
                            devices=len(strategy.parallel_devices), num_nodes=1, strategy=strategy,
                            accumulate_grad_batches=accumulate, precision=lightning_precision(precision, accelerator),
                            use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            gradient_clip_val=max_grad_norm or None, callbacks=[witness, *callbacks],
                            limit_val_batches=0)
        trainer.fit(module, train_dataloaders=loader)
    module.zero_grad(set_to_none=True)  # the shared model holds no client's gradients between fits
    return FitStats(list(module.losses), witness.grad_steps)
