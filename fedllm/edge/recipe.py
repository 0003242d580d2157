"""Recipes for asynchronous edge learning by cloned KD (``fedllm edge RECIPE``).

The main :class:`fedllm.config.Recipe` describes a federated loop (rounds, clients, aggregation);
an edge recipe describes a stream of edges that each visit once and teach a core by knowledge
distillation, so it has its own groups. They load with the same machinery (``read_yaml``,
``apply_overrides``, ``build``): unknown keys name the nearest valid one, a bad value raises
:class:`RecipeError` naming the dotted field, and the CLI prints one line and exits 2.

``workload: vision`` runs Algorithm 1 on Fashion-MNIST (:mod:`fedllm.edge.vision`);
``workload: lm`` distils next-token distributions between LoRA adapters of a causal LM
(:mod:`fedllm.edge.lm`). Both engines take an :class:`EdgeRecipe` itself: it is the one
edge config (a run uses its first seed; :meth:`EdgeRecipe.with_values` makes a study's variants).
The defaults are the measured study in ``docs/edge_study``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from fedllm.config import (
    DataConfig,
    LoraConfig,
    ModelConfig,
    PartitionConfig,
    Recipe,
    RecipeError,
    TrainConfig,
    apply_overrides,
    build,
    doc,
    read_yaml,
    require,
)


@dataclass(frozen=True)
class EdgeLag:
    edge: int = doc("edge id (0-based)", dataclasses.MISSING)
    by: int = doc("the edge's model comes back after this many later arrivals", dataclasses.MISSING)


@dataclass(frozen=True)
class NoisyEdge:
    edge: int = doc("edge id (0-based)", dataclasses.MISSING)
    p: float = doc("probability that an example's label takes part in the shuffle", dataclasses.MISSING)


@dataclass(frozen=True)
class CoreGroup:
    fraction: float = doc("share of the training pool that is the labeled core dataset D_c", 0.02)
    steps: int = doc("Phase 0: optimizer steps training the core on D_c", 600)

    def __post_init__(self) -> None:
        require(0 < self.fraction < 1, "core.fraction", f"expected in (0, 1), got {self.fraction}")
        require(self.steps >= 1, "core.steps", f"expected >= 1, got {self.steps}")


@dataclass(frozen=True)
class EdgesGroup:
    count: int = doc("edges in the stream (each visits once)", 9)
    alpha: float = doc("vision: 0 = iid edges, > 0 = Dirichlet(alpha) label skew", 0.0)
    steps: int = doc("Phase 1: optimizer steps per edge model (upper bound)", 250)
    loss_threshold: float = doc("stop Phase 1 once the mean of the last 20 losses is <= this (0: never)", 0.0)
    arrival: list[int] = doc("edge ids in arrival order (empty: 0, 1, ..., count-1)", [])
    lags: list[EdgeLag] = doc("late edges: [{edge: 2, by: 4}] returns 4 arrivals late", [])
    never_return: list[int] = doc("edges sent a clone whose model never comes back", [])
    noisy: list[NoisyEdge] = doc("vision: edges with shuffled labels, [{edge: 4, p: 0.5}]", [])

    def __post_init__(self) -> None:
        n = self.count
        require(1 <= n <= 10_000, "edges.count", f"expected in [1, 10000], got {n}")
        require(self.alpha >= 0, "edges.alpha", f"expected >= 0, got {self.alpha}")
        require(self.steps >= 1, "edges.steps", f"expected >= 1, got {self.steps}")
        require(self.loss_threshold >= 0, "edges.loss_threshold", f"expected >= 0, got {self.loss_threshold}")
        require(not self.arrival or sorted(self.arrival) == list(range(n)), "edges.arrival",
              f"expected a permutation of 0..{n - 1}, got {self.arrival}")
        ids = {"edges.lags": [x.edge for x in self.lags], "edges.never_return": self.never_return,
               "edges.noisy": [x.edge for x in self.noisy]}
        for where, edges in ids.items():
            require(all(0 <= e < n for e in edges), where, f"edge ids must be in [0, {n}), got {edges}")
            require(len(set(edges)) == len(edges), where, f"an edge is listed twice: {edges}")
        require(all(x.by >= 0 for x in self.lags), "edges.lags", "expected by >= 0")
        require(all(0 <= x.p <= 1 for x in self.noisy), "edges.noisy", "expected p in [0, 1]")


@dataclass(frozen=True)
class DistillGroup:
    steps: int = doc("Phase 2: optimizer steps on D_c per returned edge", 150)
    temperature: float = doc("t of L = CE + alpha * t^2 * KL(teacher/t || core/t)", 4.0)
    alpha: float = doc("weight of the distillation term (1 = the paper's loss)", 1.0)
    memory: int = doc("M: the last M returned edges stay teachers (temporal memory)", 1)
    ensemble: int = doc("n: clones trained per edge, each with its own batch order", 1)
    teacher_init: Literal["clone", "independent", "independent_pretrained"] = doc(
        "the edge's start: a clone of the core (CPP), a fresh init (IsPP), or a fresh init trained on "
        "D_c (IPP)", "clone")

    def __post_init__(self) -> None:
        require(self.steps >= 1, "distill.steps", f"expected >= 1, got {self.steps}")
        require(self.temperature > 0, "distill.temperature", f"expected > 0, got {self.temperature}")
        require(self.alpha >= 0, "distill.alpha", f"expected >= 0, got {self.alpha}")
        require(1 <= self.memory <= 1000, "distill.memory", f"expected in [1, 1000], got {self.memory}")
        require(1 <= self.ensemble <= 100, "distill.ensemble", f"expected in [1, 100], got {self.ensemble}")


@dataclass(frozen=True)
class EdgeTrainGroup:
    lr: float = doc("learning rate of every phase (vision: SGD, cosine decay per phase)", 0.05)
    momentum: float = doc("vision: SGD momentum", 0.9)
    batch_size: int = doc("examples per step", 64)

    def __post_init__(self) -> None:
        require(self.lr > 0, "train.lr", f"expected > 0, got {self.lr}")
        require(0 <= self.momentum < 1, "train.momentum", f"expected in [0, 1), got {self.momentum}")
        require(1 <= self.batch_size <= 4096, "train.batch_size", f"expected in [1, 4096], got {self.batch_size}")


@dataclass(frozen=True)
class VisionGroup:
    model: Literal["lenet300100", "cnn", "resnet"] = doc("vision model (fedllm.models.vision)", "lenet300100")
    data_root: str | None = doc("folder of the Fashion-MNIST .gz files (default: the Debian package's)", None)
    max_train_examples: int = doc("cut the training pool to this many images (0: all 60,000)", 0)
    max_test_examples: int = doc("cut the test set (0: all 10,000)", 0)

    def __post_init__(self) -> None:
        require(self.max_train_examples >= 0, "vision.max_train_examples", "expected >= 0")
        require(self.max_test_examples >= 0, "vision.max_test_examples", "expected >= 0")
        if self.data_root is not None:
            require(Path(self.data_root).is_dir(), "vision.data_root", f"directory {self.data_root!r} does not exist")


@dataclass(frozen=True)
class LMGroup:
    model: ModelConfig = doc("base causal LM (frozen; 4-bit NF4 unless quantization: none)", ModelConfig(preset="tiny"))
    lora: LoraConfig = doc("the adapter every party trains (core, edges)", LoraConfig(r=4, alpha=16.0, dropout=0.0))
    data: DataConfig = doc("instruction data; the held-out split is data.eval_size examples",
                           DataConfig(builtin="coralmap", max_examples=120, eval_size=16, max_length=96))
    partition: PartitionConfig = doc("how the non-core examples split over the edges (num_clients is set "
                                     "to edges.count)", PartitionConfig(method="iid"))
    eval_batch_size: int = doc("examples per evaluation forward pass", 8)

    def __post_init__(self) -> None:
        require(self.model.task == "lm", "lm.model.preset", f"expected a causal LM preset, got {self.model.preset!r}")
        require(self.eval_batch_size >= 1, "lm.eval_batch_size", f"expected >= 1, got {self.eval_batch_size}")


@dataclass(frozen=True)
class StudyGroup:
    kind: Literal["paper", "single"] = doc(
        "vision: paper = every variant of the paper's Figures 5, 7, 8 (+ memory under label skew) and "
        "the baselines; single = the configured run only (+ core-only and sync FedAvg baselines)", "paper")
    seeds: list[int] = doc("vision: one study per seed; one run (and lm) uses the first", [0, 1])
    fedavg_rounds: int = doc("rounds of the synchronous FedAvg baseline", 3)
    threads: int = doc("torch CPU threads (1 is fastest for LeNet)", 1)

    def __post_init__(self) -> None:
        require(len(self.seeds) >= 1, "study.seeds", "expected at least one seed")
        require(all(0 <= s < 2**32 for s in self.seeds), "study.seeds", f"expected seeds in [0, 2**32), got {self.seeds}")
        require(1 <= self.fedavg_rounds <= 1000, "study.fedavg_rounds", f"expected in [1, 1000], got {self.fedavg_rounds}")
        require(1 <= self.threads <= 1024, "study.threads", f"expected in [1, 1024], got {self.threads}")


@dataclass(frozen=True, kw_only=True)
class EdgeRecipe:
    name: str = doc("study name", "edge")
    workload: Literal["vision", "lm"] = doc("vision: LeNet/CNN on Fashion-MNIST; lm: LoRA adapters of a causal LM", "vision")
    core: CoreGroup = doc("the core and its dataset", CoreGroup())
    edges: EdgesGroup = doc("the stream of edges: count, Phase 1, asynchrony, noise", EdgesGroup())
    distill: DistillGroup = doc("Phase 2: distillation, memory, ensemble, teacher init", DistillGroup())
    train: EdgeTrainGroup = doc("optimizer", EdgeTrainGroup())
    vision: VisionGroup = doc("workload: vision", VisionGroup())
    lm: LMGroup = doc("workload: lm", LMGroup())
    study: StudyGroup = doc("what to run", StudyGroup())

    def __post_init__(self) -> None:
        require(bool(self.name.strip()) and not any(c in self.name for c in "/\\\0"), "name",
              f"expected a plain name, got {self.name!r}")
        if self.workload == "lm":
            require(not self.edges.noisy, "edges.noisy", "label noise applies to workload: vision only")
            require(self.edges.alpha == 0, "edges.alpha", "workload: lm splits edges with lm.partition")

    @property
    def seed(self) -> int:
        """The seed of one run: the first of study.seeds (the vision study runs once per seed)."""
        return self.study.seeds[0]

    def with_values(self, changes: dict[str, Any]) -> EdgeRecipe:
        """A copy with dotted fields changed, checked like a recipe file (a bad value raises
        :class:`RecipeError` naming the field): ``with_values({"distill.memory": 3})``."""
        values = self.to_dict()
        for key, value in changes.items():
            *groups, last = key.split(".")
            node = values
            for group in groups:
                node = node.setdefault(group, {})
                require(isinstance(node, dict), key, f"{group!r} is not a group")
            node[last] = value
        return build(EdgeRecipe, values)

    def lm_recipe(self) -> Recipe:
        """The main recipe that builds the LM workload's model, adapter and data (one client per edge)."""
        lm = self.lm
        return Recipe(name=self.name, seed=self.seed, model=lm.model, lora=lm.lora, data=lm.data,
                      partition=replace(lm.partition, num_clients=self.edges.count),
                      train=TrainConfig(batch_size=self.train.batch_size, lr=self.train.lr))

    def quick(self) -> EdgeRecipe:
        """CI size, one seed: vision on 2,000 training / 500 test images with a few dozen steps per
        phase (core 10 % of them, 40 steps; 15 per edge and per distillation; batch 32), lm to a few steps."""
        study = replace(self.study, seeds=self.study.seeds[:1])
        if self.workload == "lm":
            return replace(self, study=study, core=replace(self.core, steps=min(self.core.steps, 4)),
                           edges=replace(self.edges, steps=min(self.edges.steps, 3)),
                           distill=replace(self.distill, steps=min(self.distill.steps, 3)))
        return replace(self, study=study, core=CoreGroup(fraction=0.1, steps=40),
                       edges=replace(self.edges, steps=15), distill=replace(self.distill, steps=15),
                       train=replace(self.train, batch_size=32),
                       vision=replace(self.vision, max_train_examples=2000, max_test_examples=500))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_edge_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> EdgeRecipe:
    """Load, override and validate an edge recipe (``path=None``: the defaults, i.e. the study)."""
    try:
        values = apply_overrides(read_yaml(path) if path is not None else {}, overrides or [])
        if path is not None:
            values.setdefault("name", Path(path).stem)
        recipe = build(EdgeRecipe, values)
    except RecursionError:
        raise RecipeError(str(path), "a value is nested too deeply") from None
    if recipe.workload == "lm":
        recipe.lm_recipe()  # the main recipe's own checks on model, adapter and data
    return recipe
