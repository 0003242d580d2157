"""Recipes: typed, frozen, validated configuration groups loaded from YAML.

A recipe is a YAML file whose top-level keys are the groups below. Each group is a frozen
dataclass; every field carries a one-line doc (its ``metadata["doc"]``) and range checks live in
``__post_init__``. Loading walks the dataclasses generically, so a new field needs no parser code.

Every problem raises :class:`RecipeError` naming the dotted field (or file) and what was expected;
the CLI prints it as one line and exits with code 2.

Why one module of ~800 lines: most of it is declarative (one frozen dataclass per recipe group,
one line per field with its doc and default), and this file is the single place a user or a
reviewer reads to learn every knob, its meaning and the rules between knobs; the logic (generic
loader, overrides, compatibility rules) is small functions below the groups.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import re
import types
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fedllm import recipe_paths
from fedllm.errors import read_regular_text

log = logging.getLogger(__name__)

def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (``\\n``, ``\\x85``, ...)."""
    return "".join(repr(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") else ch
                   for ch in text)


def _show(value: Any, limit: int = 80) -> str:
    """A short repr for error messages (a huge value must not flood the one-line error)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4,300-digit str limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RecipeError(ValueError):
    """A recipe problem, reported to the user as one line: ``<where>: <what was expected>``.

    Both parts come from user input (keys, values, file names), so line breaks and control
    characters in them are escaped: the message is always exactly one line.
    """

    def __init__(self, where: str, message: str) -> None:
        where = one_line(str(where))
        super().__init__(f"{where}: {one_line(str(message))}")
        self.where = where


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with a one-line doc string (shown by ``fedllm validate --explain``)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


def require(cond: bool, where: str, message: str) -> None:
    """Raise RecipeError(where, message) unless ``cond`` (the one-line recipe error every check uses)."""
    if not cond:
        raise RecipeError(where, message)


VISION_PRESETS = ("lenet300100", "cnn", "resnet")


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["smollm2-135m", "tiny", "lenet300100", "cnn", "resnet"] = doc(
        "built-in model: SmolLM2-135M-Instruct, a tiny random llama, or a vision baseline "
        "(LeNet-300-100, small CNN, small ResNet)", "smollm2-135m")
    path: str | None = doc("local Hugging Face model directory, or a local .gguf file (dequantized once into "
                           "fedllm's cache); overrides the preset's weights", None)
    quantization: Literal["nf4", "none"] = doc("load the base in 4-bit NF4 (bitsandbytes) or full precision", "nf4")
    device: Literal["auto", "cpu", "cuda"] = doc("where to train; auto picks CUDA when present", "auto")

    def __post_init__(self) -> None:
        if self.path is not None and self.path.strip().lower().endswith(".gguf"):
            require(Path(self.path).is_file(), "model.path", f"GGUF file {self.path!r} does not exist")
        elif self.path is not None:
            require(self.path.strip() != "" and Path(self.path).is_dir(), "model.path",
                   f"directory {self.path!r} does not exist; expected a local Hugging Face model directory "
                   "(config.json, weights, tokenizer) or a .gguf file")

    @property
    def task(self) -> str:
        """"vision" for the CNN/MLP baselines, "lm" for causal language models."""
        return "vision" if self.preset in VISION_PRESETS else "lm"


@dataclass(frozen=True)
class LoraConfig:
    r: int = doc("LoRA rank", 8)
    alpha: float = doc("LoRA alpha (scaling = alpha / r)", 16.0)
    dropout: float = doc("dropout on the LoRA branch", 0.1)
    target_modules: list[str] | Literal["all-linear", "attention", "mlp"] = doc(
        "module names that get adapters, or a preset resolved per model family (fedllm.models.targets): "
        "all-linear (every linear layer but the LM head), attention or mlp", ["q_proj", "v_proj"])
    method: Literal["lora", "dora"] = doc("lora, or dora (peft's weight-decomposed LoRA: a trainable magnitude "
                                          "vector per layer, averaged like the factors)", "lora")
    client_ranks: list[int] | None = doc(
        "heterogeneous ranks: one rank per client (length partition.num_clients, each in [1, lora.r]); "
        "client k trains the first r_k slots of the global rank-lora.r adapter and the server pads and "
        "truncates (federation.lora_aggregation factorwise: HetLoRA zero-padding; svd: FlexLoRA). "
        "null: every client uses lora.r", None)

    def __post_init__(self) -> None:
        require(1 <= self.r <= 1024, "lora.r", f"expected an integer in [1, 1024], got {self.r}")
        if self.client_ranks is not None:
            require(len(self.client_ranks) > 0, "lora.client_ranks", "expected a list of ranks, one per client")
            for i, rk in enumerate(self.client_ranks):
                require(isinstance(rk, int) and not isinstance(rk, bool) and 1 <= rk <= self.r,
                        f"lora.client_ranks[{i}]", f"expected an integer in [1, lora.r={self.r}], got {_show(rk)}")
        require(self.alpha > 0, "lora.alpha", f"expected > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, "lora.dropout", f"expected in [0, 1), got {self.dropout}")
        require(len(self.target_modules) > 0, "lora.target_modules", "expected at least one module name")
        if isinstance(self.target_modules, str):  # a direct construction; YAML/overrides are checked by _coerce
            require(self.target_modules in ("all-linear", "attention", "mlp"), "lora.target_modules",
                    f"expected a list of module names or all-linear, attention or mlp, got {_show(self.target_modules)}")


@dataclass(frozen=True)
class DataConfig:
    builtin: Literal["coralmap", "fashion_mnist"] | None = doc(
        "built-in data: coralmap (instruction pairs built from an installed package) or "
        "fashion_mnist (IDX files of the Debian package dataset-fashion-mnist)", None)
    root: str | None = doc("folder with Fashion-MNIST-style IDX files (vision; default: the Debian package's)", None)
    open_data: int = doc("vision: unlabeled training images held out for the server (HP-FL pre-training)", 0)
    path: str | None = doc("JSONL, CSV, parquet file, a directory of parquet files or a saved `datasets` directory "
                           "(relative: from the recipe file's folder; on the command line: from the working directory)",
                           None)
    prompt_field: str = doc("column with the user prompt", "prompt")
    response_field: str = doc("column with the reference response", "response")
    messages_field: str | None = doc("column with a chat `messages` list (overrides prompt/response)", None)
    system_prompt: str | None = doc("system message prepended to every conversation", None)
    template: str = doc("how a conversation becomes tokens: chat (the tokenizer's chat template), alpaca (Alpaca's "
                        "instruction/response layout, for base models without one), or a string with {prompt} "
                        "(and optionally {system}) that ends where the response begins", "chat")
    max_length: int = doc("truncate tokenized examples to this many tokens", 256)
    max_examples: int | None = doc("use at most this many examples (seeded subsample)", None)
    eval_size: int = doc("held-out evaluation examples (taken before partitioning)", 32)
    validation_fraction: float = doc(
        "language models: fraction of each client's training examples moved (seeded, per client) into a validation "
        "split that every mode scores (val_loss) for the best round, early stopping and LR selection; never the "
        "held-out split; 0 disables", 0.0)
    bad_rows: Literal["error", "skip"] = doc("a row with a missing/empty field: stop with its line, or skip and count", "error")
    streaming: bool = doc("keep the rows memory-mapped (Arrow via `datasets`) and tokenize each one when a client "
                          "reads it, so memory does not grow with the data: data.path a .parquet file, a directory "
                          "of them or a saved `datasets` directory; bad_rows: error only (a bad row stops the run "
                          "when first read, naming it)", False)

    def __post_init__(self) -> None:
        require((self.builtin is None) != (self.path is None), "data",
               "set exactly one of data.builtin or data.path")
        if self.path is not None:
            require(self.path.strip() != "" and Path(self.path).exists(), "data.path",
                   f"file {self.path!r} does not exist")
        require(8 <= self.max_length <= 32768, "data.max_length", f"expected in [8, 32768], got {self.max_length}")
        require(self.template in ("chat", "alpaca") or "{prompt}" in self.template, "data.template",
                f"expected chat, alpaca or a string containing {{prompt}}, got {_show(self.template)}")
        if self.template not in ("chat", "alpaca"):
            try:
                self.template.format(prompt="", system="")
            except (KeyError, IndexError, ValueError) as exc:
                raise RecipeError("data.template", f"expected only {{prompt}} and {{system}} fields "
                                  f"(write {{{{ }}}} for a literal brace), got {type(exc).__name__}: {exc}") from None
        require(self.eval_size >= 1, "data.eval_size", f"expected >= 1, got {self.eval_size}")
        require(0 <= self.validation_fraction <= 0.5, "data.validation_fraction",
                f"expected a fraction in [0, 0.5], got {self.validation_fraction}")
        if self.max_examples is not None:
            require(self.max_examples >= 2, "data.max_examples", f"expected >= 2, got {self.max_examples}")
        require(0 <= self.open_data <= 1_000_000, "data.open_data", f"expected in [0, 1000000], got {self.open_data}")
        if self.root is not None:
            require(Path(self.root).is_dir(), "data.root", f"directory {self.root!r} does not exist")
        if self.streaming:
            self._check_streaming()

    def _check_streaming(self) -> None:
        """``streaming`` reads Arrow-backed rows only, and cannot skip rows it has not tokenized yet."""
        what = "a .parquet file, a directory of parquet files or a saved datasets directory (save_to_disk)"
        require(self.path is not None, "data.streaming", f"expected data.path to be {what}; built-in data "
                "is not streamed (set data.streaming: false)")
        require(Path(self.path).is_dir() or Path(self.path).suffix.lower() == ".parquet", "data.streaming",
                f"expected data.path to be {what}, got {self.path!r} (JSONL and CSV are read whole: convert "
                "them to parquet, or set data.streaming: false)")
        require(self.bad_rows == "error", "data.streaming", "expected data.bad_rows: error; skipping a bad row "
                "changes the example count the eval split and partition are drawn from, which a run that "
                "tokenizes rows only when it reads them does not know up front (set data.streaming: false to skip)")


@dataclass(frozen=True)
class PartitionConfig:
    method: Literal["iid", "dirichlet", "natural", "quantity_skew", "shards"] = doc("how examples are split across clients", "iid")
    num_clients: int = doc("number of simulated clients", 3)
    column: str | None = doc("label/topic column for dirichlet, natural and shards (vision: the class label)", None)
    alpha: float = doc("Dirichlet concentration (dirichlet: over labels; quantity_skew: over sizes)", 0.5)
    shards_per_client: int = doc("shards each client gets (shards method)", 2)
    min_examples: int = doc("every client must hold at least this many examples", 1)
    # compare=False: it only decides whether a split is accepted, never what the split is, so a
    # recorded run (a study part) written before this field existed still equals its recipe
    merge_values: bool = doc("natural: with fewer clients than column values, let a client hold several values "
                             "(largest groups to the emptiest client; its name joins them with +); false refuses "
                             "the mismatch", False, compare=False)

    def __post_init__(self) -> None:
        require(1 <= self.num_clients <= 100_000, "partition.num_clients", f"expected in [1, 100000], got {self.num_clients}")
        require(self.alpha > 0, "partition.alpha", f"expected > 0, got {self.alpha}")
        require(self.shards_per_client >= 1, "partition.shards_per_client", "expected >= 1")
        require(self.min_examples >= 1, "partition.min_examples", "expected >= 1")


@dataclass(frozen=True)
class FederationConfig:
    algorithm: Literal["gradualdiff", "fedavg", "fedprox", "scaffold", "fednova"] = doc(
        "gradualdiff: mean of deltas (1/K); fedavg: example-weighted mean; fedprox: + proximal term "
        "mu/2 |theta - theta_g|^2; scaffold: control variates; fednova: deltas normalized by local steps",
        "gradualdiff")
    weighted: bool | None = doc("weight the mean by examples (default: false for gradualdiff, true otherwise)", None)
    rounds: int = doc("federated rounds", 3)
    fraction: float = doc("fraction of clients sampled each round (seeded)", 1.0)
    min_clients: int = doc("fewest valid updates needed to apply a round", 1)
    on_too_few: Literal["skip", "retry"] = doc("a round with < min_clients valid updates: keep the global state "
                                               "(skip) or sample again (retry)", "skip")
    max_retries: int = doc("re-samples of a round before it is skipped (on_too_few: retry)", 2)
    reject_norm: float | None = doc("reject (do not aggregate) an update whose L2 norm exceeds this", None)
    reject_norm_factor: float | None = doc(
        "reject an update whose L2 norm exceeds this many times the median norm of the round's updates "
        "(rounds with >= 3 updates the server can see; null disables)", 100.0)
    max_change_ratio: float | None = doc(
        "reject a round (keep the global state) whose new global state differs from the old one by more "
        "than this many times the old state's L2 norm (skipped while that norm is 0; null disables)", 10.0)
    max_client_examples: int = doc(
        "most training examples one client may report (at discovery and in each reply); a count that is "
        "not an integer in [1, this] leaves the site out of the run, its rounds count as failed clients", 10_000_000)
    max_client_weight: float | None = doc(
        "largest share of a round's example-weighted mean (FedAvg, FedNova's p_i, svd LoRA) one client can "
        "carry: weights above c = max(this, 1/K) are set to c and the rest shared by the others in proportion "
        "to their weights, repeated until none exceeds c (sum stays 1; rounds where none exceeds c keep their "
        "weights bit for bit; docs/deploy.md); null: weights as counted", None)
    mu: float = doc("FedProx proximal coefficient", 0.01)
    lora_aggregation: Literal["factorwise", "svd", "frozen_a", "exact"] = doc(
        "factorwise: average dA and dB (the paper's); svd: average B_i A_i and keep its best rank-r "
        "factorization (Eckart-Young; exact only when that mean has rank <= r); frozen_a: A frozen at "
        "its shared init, only B trained; exact: old name of svd (accepted, with a warning)", "factorwise")
    engine: Literal["inprocess", "flower"] = doc("inprocess: simulate all clients here; flower: Flower simulation", "inprocess")
    personalize: Literal["none", "shared_a"] = doc(
        "none: every client starts each round from the global adapter; shared_a: FedSA-LoRA's selective "
        "aggregation (A factors shared, each client keeps its own B and starts from it; the server's B is "
        "the clients' average, evaluated beside the personal models). Needs eval.client_holdout > 0", "none")
    fused_clients: bool = doc(
        "language models: train a round's clients together, one forward and backward of the shared base over "
        "their concatenated batches, each example through its own client's LoRA factors (same updates)", False)
    topology: Literal["server", "gossip"] = doc(
        "server: clients send updates to a server that aggregates them; gossip: no server, every client trains "
        "its own adapter and then averages it with its graph neighbours' (Metropolis weights, decentralized SGD)",
        "server")
    graph: Literal["ring", "random-k"] | list[list[int]] = doc(
        "gossip: who averages with whom: ring (client i with i-1 and i+1), random-k (each client links to "
        "graph_k others drawn with the seed, redrawn until connected) or an edge list [[i, j], ...]", "ring")
    graph_k: int = doc("gossip with graph random-k: links each client draws", 2)
    clusters: int = doc(
        "IFCA clustered FL (Ghosh et al. 2020): this many cluster models; each sampled client trains the one "
        "with the lowest loss on its own training data, the server averages per cluster (1: one global model)", 1)
    cluster_init: Literal["perturb", "clients", "farthest"] = doc(
        "clusters > 1: how the k models start apart: perturb (the initial state plus seeded Gaussian noise of "
        "std cluster_init_scale; LoRA: on the B factors only), clients (each from one local fit of k distinct "
        "clients drawn with the seed, before round 1) or farthest (every client fits once before round 1; the "
        "first of the k is drawn with the seed, each next is the client whose update is farthest in cosine "
        "distance from those chosen: k-means++-style seeding, Arthur & Vassilvitskii 2007)", "perturb")
    cluster_init_scale: float = doc(
        "clusters > 1 with cluster_init perturb: std of the Gaussian noise added to each cluster's initial state", 0.01)

    def __post_init__(self) -> None:
        require(1 <= self.rounds <= 100_000, "federation.rounds", f"expected in [1, 100000], got {self.rounds}")
        require(0 < self.fraction <= 1, "federation.fraction", f"expected in (0, 1], got {self.fraction}")
        require(self.min_clients >= 1, "federation.min_clients", f"expected >= 1, got {self.min_clients}")
        require(0 <= self.max_retries <= 100, "federation.max_retries", f"expected in [0, 100], got {self.max_retries}")
        require(0 <= self.mu <= 1e6, "federation.mu", f"expected in [0, 1e6], got {self.mu}")
        if self.reject_norm is not None:
            require(self.reject_norm > 0, "federation.reject_norm", f"expected > 0, got {self.reject_norm}")
        if self.reject_norm_factor is not None:
            require(self.reject_norm_factor > 1, "federation.reject_norm_factor",
                    f"expected > 1 (a multiple of the median norm), got {self.reject_norm_factor}")
        if self.max_change_ratio is not None:
            require(math.isfinite(self.max_change_ratio) and self.max_change_ratio > 0, "federation.max_change_ratio",
                    f"expected a positive number (a multiple of the global state's norm), got {self.max_change_ratio}")
        require(1 <= self.max_client_examples <= 2 ** 53, "federation.max_client_examples",
                f"expected an integer in [1, 2^53], got {self.max_client_examples}")
        if self.max_client_weight is not None:
            require(0 < self.max_client_weight <= 1, "federation.max_client_weight",
                    f"expected a share in (0, 1], got {self.max_client_weight}")
        if self.lora_aggregation == "exact":  # it is the best rank-r re-factorization, not exact
            log.warning("federation.lora_aggregation: 'exact' is now called 'svd' (the best rank-r "
                        "factorization of the mean product); using svd")
            object.__setattr__(self, "lora_aggregation", "svd")
        require(1 <= self.graph_k <= 100_000, "federation.graph_k", f"expected in [1, 100000], got {self.graph_k}")
        require(1 <= self.clusters <= 1000, "federation.clusters", f"expected in [1, 1000], got {self.clusters}")
        require(math.isfinite(self.cluster_init_scale) and self.cluster_init_scale >= 0,
                "federation.cluster_init_scale", f"expected a finite number >= 0, got {self.cluster_init_scale}")
        if isinstance(self.graph, list):
            for i, edge in enumerate(self.graph):
                require(len(edge) == 2 and edge[0] != edge[1] and min(edge) >= 0, f"federation.graph[{i}]",
                        f"expected an edge [i, j] between two different client ids, got {_show(edge)}")

    @property
    def is_weighted(self) -> bool:
        return self.weighted if self.weighted is not None else self.algorithm != "gradualdiff"


@dataclass(frozen=True)
class ServerConfig:
    optimizer: Literal["none", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = doc(
        "server optimizer applied to the aggregated delta (none: theta_g += delta)", "none")
    lr: float = doc("server learning rate (fedavgm, fedadam, fedyogi, fedadagrad)", 1.0)
    momentum: float = doc("fedavgm momentum", 0.9)
    beta1: float = doc("first-moment decay (adaptive optimizers)", 0.9)
    beta2: float = doc("second-moment decay (adaptive optimizers)", 0.99)
    tau: float = doc("adaptivity epsilon (adaptive optimizers)", 1e-3)

    def __post_init__(self) -> None:
        require(self.lr > 0, "server.lr", f"expected > 0, got {self.lr}")
        for name in ("momentum", "beta1", "beta2"):
            v = getattr(self, name)
            require(0 <= v < 1, f"server.{name}", f"expected in [0, 1), got {v}")
        require(self.tau > 0, "server.tau", f"expected > 0, got {self.tau}")


def krum_min_updates(byzantine: int, multi: int | None = 1) -> int:
    """Fewest updates Krum can score with f Byzantine clients: K > 2f + 2 (Blanchard et al., 2017);
    multi-Krum also needs K >= m. The one statement of the rule (recipe check, aggregator, server)."""
    return max(2 * byzantine + 3, multi or 1)


@dataclass(frozen=True)
class RobustConfig:
    aggregator: Literal["mean", "median", "trimmed_mean", "krum", "multi_krum", "geomed", "bulyan",
                        "centered_clip", "afa"] = doc(
        "mean (per the algorithm), coordinate-wise median, trimmed mean, Krum, multi-Krum, geometric "
        "median (RFA), Bulyan (repeated Krum + trimmed median; K >= 4f + 3), centered clipping "
        "(Karimireddy et al. 2021: clip each update's offset from the last aggregate to clip_radius) or AFA "
        "(Munoz-Gonzalez et al. 2019: cosine filter around the mean, Beta reputations, blocking)", "mean")
    trim_ratio: float = doc("trimmed_mean: fraction beta cut from each end per coordinate", 0.1)
    byzantine: int = doc("krum/multi_krum: assumed number f of Byzantine clients per round", 1)
    multi: int | None = doc("multi_krum: updates kept (default K - f)", None)
    max_norm: float | None = doc("clip every update to this L2 norm before aggregating (norm bound)", None)
    clip_radius: float = doc("centered_clip: tau, the L2 radius each update's offset from the last aggregate "
                             "is clipped to", 1.0)
    clip_iterations: int = doc("centered_clip: clipping iterations per round (L)", 1)

    def __post_init__(self) -> None:
        require(0 <= self.trim_ratio < 0.5, "robust.trim_ratio", f"expected in [0, 0.5), got {self.trim_ratio}")
        require(math.isfinite(self.clip_radius) and self.clip_radius > 0, "robust.clip_radius",
                f"expected a positive number, got {self.clip_radius}")
        require(1 <= self.clip_iterations <= 100, "robust.clip_iterations",
                f"expected in [1, 100], got {self.clip_iterations}")
        require(self.byzantine >= 0, "robust.byzantine", f"expected >= 0, got {self.byzantine}")
        if self.multi is not None:
            require(self.multi >= 1, "robust.multi", f"expected >= 1, got {self.multi}")
        if self.max_norm is not None:
            require(self.max_norm > 0, "robust.max_norm", f"expected > 0, got {self.max_norm}")


@dataclass(frozen=True)
class SelectionConfig:
    method: Literal["uniform", "poisson", "round_robin", "importance", "power_of_choice", "diversity"] = doc(
        "uniform (fraction*K without replacement), poisson (each client with probability fraction), "
        "round-robin, importance (prop. to examples), power-of-choice or diversity (fraction*K clients "
        "covering the label space: stochastic-greedy facility location over label histograms)", "uniform")
    candidates: int | None = doc("power_of_choice: d candidates sampled, the m = fraction*K with the highest "
                                 "local loss kept (default 2m)", None)

    def __post_init__(self) -> None:
        if self.candidates is not None:
            require(self.candidates >= 1, "selection.candidates", f"expected >= 1, got {self.candidates}")


@dataclass(frozen=True)
class HierarchyConfig:
    regions: int = doc("group clients into this many regions (0: flat federation)", 0)
    by: Literal["round_robin", "contiguous"] = doc("assign clients to regions round-robin (k mod R) or in contiguous id blocks", "round_robin")
    global_every: int = doc("regional aggregation every round, global aggregation every this many rounds", 1)

    def __post_init__(self) -> None:
        require(0 <= self.regions <= 10_000, "hierarchy.regions", f"expected in [0, 10000], got {self.regions}")
        require(1 <= self.global_every <= 10_000, "hierarchy.global_every", f"expected >= 1, got {self.global_every}")


@dataclass(frozen=True)
class AttackConfig:
    kind: Literal["none", "label_flip", "sign_flip", "scale", "noise", "alie", "ipm", "backdoor"] = doc(
        "simulated attack (studies and tests); alie (a little is enough: mean - z*std of the honest "
        "updates per coordinate) and ipm (inner-product manipulation: -epsilon x the honest mean) collude: "
        "the attackers see the round's honest updates; backdoor: model replacement (Bagdasaryan et al. 2020), "
        "train on trigger-stamped images relabelled to backdoor_target, send boost x the update", "none")
    fraction: float = doc("fraction of clients that attack", 0.2)
    scale: float = doc("sign_flip/scale: factor applied to the update", 10.0)
    noise_std: float = doc("noise: std of the Gaussian update sent", 1.0)
    ipm_epsilon: float = doc("ipm: epsilon (Xie et al. 2020: 0.1 against Krum, large values against the median)", 0.5)
    alie_z: float | None = doc("alie: z (default Baruch et al.'s z_max from the round's n clients and m attackers)", None)
    boost: float | None = doc("backdoor: gamma, the factor the attacker scales its update by (default n/eta: "
                              "clients per round, the model-replacement boost for the uniform mean applied with step 1)", None)
    backdoor_target: int = doc("backdoor: the class trigger-stamped images are relabelled to", 0)
    poison_fraction: float = doc("backdoor: fraction of the attacker's examples stamped and relabelled", 0.5)
    backdoor_rounds: list[int] | None = doc("backdoor: the rounds the attacker poisons and boosts in (default every "
                                            "round); in the others it trains and sends honestly", None)

    def __post_init__(self) -> None:
        require(0 <= self.fraction <= 1, "attack.fraction", f"expected in [0, 1], got {self.fraction}")
        require(self.noise_std >= 0, "attack.noise_std", f"expected >= 0, got {self.noise_std}")
        require(math.isfinite(self.ipm_epsilon) and self.ipm_epsilon > 0, "attack.ipm_epsilon",
                f"expected a positive number, got {self.ipm_epsilon}")
        if self.alie_z is not None:
            require(math.isfinite(self.alie_z), "attack.alie_z", f"expected a number, got {self.alie_z}")
        if self.boost is not None:
            require(math.isfinite(self.boost) and self.boost > 0, "attack.boost", f"expected > 0, got {self.boost}")
        require(0 <= self.backdoor_target <= 9, "attack.backdoor_target", f"expected a class in 0 .. 9, got {self.backdoor_target}")
        require(0 < self.poison_fraction <= 1, "attack.poison_fraction", f"expected in (0, 1], got {self.poison_fraction}")
        if self.backdoor_rounds is not None:
            require(bool(self.backdoor_rounds) and min(self.backdoor_rounds) >= 1, "attack.backdoor_rounds",
                    f"expected a non-empty list of rounds >= 1, got {self.backdoor_rounds}")


@dataclass(frozen=True)
class AuditConfig:
    canaries: int = doc("privacy audit (fedllm.algorithms.audit): canaries planted, each included with probability 1/2 "
                        "(Steinke et al. 2023); fedllm audit RUN_DIR and the end of the run print the measured leakage "
                        "and a lower bound on epsilon; 0: no audit", 0)
    kind: Literal["auto", "example", "client"] = doc(
        "example: random-secret records in the clients' data (a record: DP-SGD's unit); client: canary clients whose "
        "update is a random direction of norm privacy.clip (a whole client: client-level DP's unit, Andrew et al. "
        "2024); auto: client under privacy.dp, example otherwise", "auto")
    clients: list[int] | None = doc("example canaries: the clients whose data they join (null: every client)", None)
    secret_digits: int = doc("example canaries: random digits in each secret", 12)
    confidence: float = doc("confidence (1 - beta) of the lower bound on epsilon", 0.95)

    def __post_init__(self) -> None:
        require(self.canaries == 0 or 2 <= self.canaries <= 100_000, "privacy.audit.canaries",
                f"expected 0 (off) or a count in [2, 100000], got {self.canaries}")
        require(4 <= self.secret_digits <= 64, "privacy.audit.secret_digits", f"expected in [4, 64], got {self.secret_digits}")
        require(0.5 <= self.confidence < 1, "privacy.audit.confidence", f"expected in [0.5, 1), got {self.confidence}")
        require(self.clients is None or len(self.clients) > 0, "privacy.audit.clients", "expected client ids or null")

    def unit(self, dp: str) -> str:
        """The canary kind the audit uses under ``privacy.dp`` = ``dp``."""
        return self.kind if self.kind != "auto" else ("client" if dp != "none" else "example")


@dataclass(frozen=True)
class PrivacyConfig:
    dp: Literal["none", "server", "client"] = doc(
        "client-level DP: server adds noise to the clipped sum (trusted aggregator) or each client adds its share", "none")
    clip: float = doc("C: L2 bound on each client's delta", 1.0)
    noise_multiplier: float = doc("sigma: noise std in units of C", 1.0)
    target_epsilon: float | None = doc("derive sigma so the planned rounds spend this epsilon", None)
    delta: float = doc("delta of the (epsilon, delta) guarantee", 1e-5)
    accountant: Literal["rdp", "prv"] = doc("opacus accountant", "rdp")
    adaptive_clip: bool = doc("adaptive quantile clipping (Andrew et al. 2021; server mode)", False)
    target_quantile: float = doc("adaptive clipping: fraction of updates left unclipped", 0.5)
    secure_aggregation: bool = doc("pairwise-mask secure aggregation (server sees only the sum)", False)
    secagg_threshold: float = doc("fraction of a round's clients whose shares rebuild a dropped client's masks", 0.6)
    secagg_scheme: Literal["masks", "he"] = doc(
        "how secure aggregation hides each upload: pairwise masks (Bonawitz et al. 2017) or CKKS homomorphic "
        "encryption (TenSEAL, the `he` extra; a key holder apart from the server decrypts only the sum)", "masks")
    dpsgd: bool = doc("sample-level DP-SGD on each client through Opacus (vision models and LoRA factors)", False)
    dpsgd_noise: float = doc("DP-SGD noise multiplier", 1.0)
    dpsgd_clip: float = doc("DP-SGD per-sample clipping norm", 1.0)
    audit: AuditConfig = doc("canaries and the one-run privacy audit (docs/howto/privacy-audit.md)", AuditConfig())

    def __post_init__(self) -> None:
        require(self.clip > 0, "privacy.clip", f"expected > 0, got {self.clip}")
        require(self.noise_multiplier >= 0, "privacy.noise_multiplier", f"expected >= 0, got {self.noise_multiplier}")
        if self.target_epsilon is not None:
            require(self.target_epsilon > 0, "privacy.target_epsilon", f"expected > 0, got {self.target_epsilon}")
        require(0 < self.delta < 1, "privacy.delta", f"expected in (0, 1), got {self.delta}")
        require(0 < self.target_quantile < 1, "privacy.target_quantile", f"expected in (0, 1), got {self.target_quantile}")
        require(0 < self.secagg_threshold <= 1, "privacy.secagg_threshold", f"expected in (0, 1], got {self.secagg_threshold}")
        require(self.dpsgd_noise >= 0, "privacy.dpsgd_noise", f"expected >= 0, got {self.dpsgd_noise}")
        require(self.dpsgd_clip > 0, "privacy.dpsgd_clip", f"expected > 0, got {self.dpsgd_clip}")

    @property
    def enabled(self) -> bool:
        return self.dp != "none"


@dataclass(frozen=True)
class CompressionConfig:
    codec: Literal["none", "fp16", "q8", "q4", "q2", "sign", "topk"] = doc(
        "update encoding: none, fp16, 8/4/2-bit stochastic quantization, 1-bit sign with scale, top-k", "none")
    topk_fraction: float = doc("topk: fraction of coordinates kept", 0.01)
    error_feedback: bool = doc("keep the compression error on the client and add it to the next update", True)

    def __post_init__(self) -> None:
        require(0 < self.topk_fraction <= 1, "compression.topk_fraction", f"expected in (0, 1], got {self.topk_fraction}")


@dataclass(frozen=True)
class PruneConfig:
    method: Literal["none", "hpfl", "snip", "random"] = doc(
        "train a subnetwork: HP-FL lottery ticket (DAE on open data + IMP with rewinding), SNIP, or a random mask",
        "none")
    remaining: float = doc("fraction of prunable weights kept", 0.1)
    iterations: int = doc("hpfl: pruning iterations N_p (each prunes the same fraction of survivors)", 5)
    dae_epochs: int = doc("hpfl: DAE training epochs per iteration on the open data", 2)
    dae_lr: float = doc("hpfl: Adam learning rate of the DAE", 1e-3)
    pretrain: bool = doc("hpfl: start FL from the DAE-trained encoder (false: rewind to init, the lottery ticket)", False)
    snip_batch: int = doc("snip: examples in the one mini-batch that scores connections", 100)
    init: Literal["none", "isometry"] = doc(
        "initial kept weights: none (the model's own init, masked), or isometry (Lee et al. 2020: each masked "
        "weight solved for singular values 1 before training; with method none, every weight counts as kept)", "none")
    isometry_steps: int = doc("isometry: gradient steps per weight matrix (fedllm.algorithms.signal)", 300)

    def __post_init__(self) -> None:
        require(0 < self.remaining <= 1, "prune.remaining", f"expected in (0, 1], got {self.remaining}")
        require(1 <= self.iterations <= 100, "prune.iterations", f"expected in [1, 100], got {self.iterations}")
        require(0 <= self.dae_epochs <= 1000, "prune.dae_epochs", f"expected in [0, 1000], got {self.dae_epochs}")
        require(self.dae_lr > 0, "prune.dae_lr", f"expected > 0, got {self.dae_lr}")
        require(self.snip_batch >= 1, "prune.snip_batch", f"expected >= 1, got {self.snip_batch}")
        require(1 <= self.isometry_steps <= 100_000, "prune.isometry_steps",
                f"expected in [1, 100000], got {self.isometry_steps}")


@dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = doc("write the whole server state after every round (atomic, checksummed)", True)
    keep: int = doc("checkpoints kept (older ones deleted)", 2)

    def __post_init__(self) -> None:
        require(1 <= self.keep <= 1000, "checkpoint.keep", f"expected in [1, 1000], got {self.keep}")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = doc("optimizer steps each client runs per round (exclusive with local_epochs: leave it at "
                           "its default, 10, when local_epochs is set)", 10)
    batch_size: int = doc("examples per step", 4)
    optimizer: Literal["auto", "adamw", "sgd"] = doc(
        "client optimizer: adamw, sgd (with momentum), or auto (adamw for language models, sgd for vision)", "auto")
    lr: float = doc("learning rate", 2e-4)
    momentum: float = doc("sgd momentum (adamw ignores it)", 0.0)
    local_epochs: float | None = doc(
        "passes over the data per round instead of local_steps (a fraction such as 0.25 runs that share of a pass): federated, each sampled client passes its share this "
        "many times; centralized, the pooled data of the round's clients; local, each client its own data "
        "ceil(E x ceil(ceil(n / batch_size) / grad_accum)) optimizer steps; rows then carry `epochs`)", None)
    weight_decay: float = doc("weight decay: AdamW's decoupled decay, or SGD's L2 penalty on the gradient", 0.001)
    warmup_ratio: float = doc("fraction of a client's steps with linear warm-up", 0.03)
    max_grad_norm: float = doc("gradient clipping norm (0 disables)", 0.3)
    noop_guard: Literal["error", "warn"] = doc(
        "a fit with lr > 0 whose gradients never reach a trainable parameter, or a round whose updates "
        "are all exactly zero: error (stop the run, exit 3) or warn", "error")
    grad_accum: int = doc("language models: batches whose gradients are averaged into one optimizer step (Lightning's "
                          "accumulate_grad_batches); local_steps counts optimizer steps", 1)
    gradient_checkpointing: bool = doc("language models: recompute activations in the backward pass instead of "
                                       "keeping them (less memory, about a third more time)", False)
    precision: Literal["32", "bf16", "bf16-mixed", "16-mixed"] = doc(
        "language models: client training numerics: 32 (exact fp32), bf16 (the 4-bit base dequantizes to bf16 and "
        "every matmul runs in bf16 under autocast, LoRA weights and AdamW state stay fp32; needs AVX512-BF16/AMX "
        "or a bf16 GPU; evaluation stays fp32), bf16-mixed (Lightning's autocast only), 16-mixed (CUDA)", "32")
    head_positions: Literal["auto", "all", "labeled"] = doc(
        "language models: training runs the LM head on every position (all: HF's model(**batch).loss) or only on "
        "the positions that have a label (labeled: the same loss up to float rounding, less work); auto: labeled "
        "under precision bf16, all otherwise", "auto")
    length_bucketing: int = doc(
        "language models: 0 off; n > 0: each seeded shuffle of a client's examples is cut into pools of n batches, "
        "each pool sorted by length into batches (less padding; changes which examples share a batch)", 0)
    schedule: Literal["constant", "cosine", "linear"] = doc(
        "language models: learning rate across rounds by global step (round - 1) x steps + step, on top of the "
        "per-client warm-up: constant, cosine or linear decay towards 0 at the end of the last round", "constant")
    devices: int = doc(
        "language models: processes that train each client fit together (Lightning DDP, one 4-bit base each: gloo on "
        "CPU cores, NCCL on GPUs); batch_size is per process, so a step sees devices x batch_size examples", 1)

    def __post_init__(self) -> None:
        require(1 <= self.local_steps <= 1_000_000, "train.local_steps", f"expected >= 1, got {self.local_steps}")
        require(1 <= self.batch_size <= 4096, "train.batch_size", f"expected in [1, 4096], got {self.batch_size}")
        require(self.lr >= 0, "train.lr", f"expected >= 0, got {self.lr}")
        require(self.weight_decay >= 0, "train.weight_decay", f"expected >= 0, got {self.weight_decay}")
        require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", f"expected in [0, 1), got {self.warmup_ratio}")
        require(self.max_grad_norm >= 0, "train.max_grad_norm", f"expected >= 0, got {self.max_grad_norm}")
        require(0 <= self.momentum < 1, "train.momentum", f"expected in [0, 1), got {self.momentum}")
        require(1 <= self.grad_accum <= 1024, "train.grad_accum", f"expected in [1, 1024], got {self.grad_accum}")
        require(0 <= self.length_bucketing <= 100_000, "train.length_bucketing",
                f"expected 0 (off) or a pool size in batches in [1, 100000], got {self.length_bucketing}")
        require(1 <= self.devices <= 64, "train.devices", f"expected in [1, 64], got {self.devices}")
        if self.local_epochs is not None:
            require(0 < self.local_epochs <= 10_000, "train.local_epochs", f"expected in (0, 10000], got {self.local_epochs}")
            require(self.local_steps == TrainConfig.local_steps, "train.local_steps",
                    f"set either train.local_steps ({self.local_steps}) or train.local_epochs ({self.local_epochs}), "
                    "not both: with local_epochs the steps follow from each client's data (leave local_steps out, i.e. at "
                    f"its default {TrainConfig.local_steps})")

    def optimizer_for(self, task: str) -> Literal["adamw", "sgd"]:
        """The optimizer a client of ``task`` ("lm" or "vision") builds; ``auto`` keeps each task's
        historical one (AdamW for LoRA, SGD for the vision baselines)."""
        if self.optimizer != "auto":
            return self.optimizer
        return "sgd" if task == "vision" else "adamw"


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = doc("examples per evaluation forward pass", 8)
    bleu_samples: int = doc("eval prompts answered greedily for BLEU (0 disables)", 8)
    max_new_tokens: int = doc("tokens generated per BLEU prompt", 48)
    targets: list[float] = doc("vision: test accuracies x for NRA@x, CCA@x, CTA@x in the summary", [])
    every: int = doc("evaluate every this many rounds (the last round always)", 1)
    patience: int | None = doc("early stopping: stop after this many evaluations without a new lowest val_loss "
                               "(needs data.validation_fraction > 0; local mode: each client on its own); "
                               "null: train every round", None)
    client_holdout: float = doc("language models: fraction of each client's own examples held out (seeded) to "
                                "score the models on that client's data; 0 disables", 0.0)
    lora_error: bool = doc("LoRA with the mean: report lora_aggregation_error (what averaging the factors loses "
                           "against averaging B_i A_i); it needs every client's factors of a round in server "
                           "memory, so false lets the server fold the mean as updates arrive", True)

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "eval.batch_size", f"expected >= 1, got {self.batch_size}")
        require(0 <= self.client_holdout <= 0.5, "eval.client_holdout",
                f"expected a fraction in [0, 0.5], got {self.client_holdout}")
        require(self.bleu_samples >= 0, "eval.bleu_samples", f"expected >= 0, got {self.bleu_samples}")
        require(1 <= self.max_new_tokens <= 4096, "eval.max_new_tokens", f"expected in [1, 4096], got {self.max_new_tokens}")
        for x in self.targets:
            require(0 < x <= 1, "eval.targets", f"expected accuracies in (0, 1], got {x}")
        require(1 <= self.every <= 100_000, "eval.every", f"expected >= 1, got {self.every}")
        if self.patience is not None:
            require(1 <= self.patience <= 100_000, "eval.patience", f"expected >= 1 or null, got {self.patience}")


@dataclass(frozen=True)
class OutputConfig:
    dir: str = doc("root folder for run directories", "runs")
    plots: bool = doc("write PNG plots", True)
    save_adapter: bool = doc("save the final adapter (PeftModel.from_pretrained loads it)", True)
    loggers: list[str] = doc("Lightning loggers that also get every round metric and client step loss, "
                             "under <run>/logs/: csv, tensorboard", [])

    def __post_init__(self) -> None:
        bad = [x for x in self.loggers if x not in ("csv", "tensorboard")]
        require(not bad and len(set(self.loggers)) == len(self.loggers), "output.loggers",
                f"expected a list of distinct names from ['csv', 'tensorboard'], got {self.loggers}")


@dataclass(frozen=True)
class FaultsConfig:
    nan_clients: list[int] = doc("clients whose update is replaced by NaN (fault injection for tests/demos)", [])
    error_clients: list[int] = doc("clients that raise an exception during local training", [])
    rounds: list[int] = doc("rounds in which the faults fire (empty: every round)", [])
    error_prob: float = doc("probability that a sampled client raises during training (seeded per round/client)", 0.0)
    nan_prob: float = doc("probability that a sampled client returns a NaN update (seeded)", 0.0)
    dropout_prob: float = doc("probability that a sampled client never reports (seeded)", 0.0)
    straggler_fraction: float = doc("fraction of sampled clients that are slow (seeded)", 0.0)
    straggler_speed: float = doc("a straggler completes this fraction of its local steps by the deadline", 0.5)
    stragglers: Literal["partial", "drop"] = doc("a straggler's partial work is aggregated (partial) or dropped", "partial")
    unmask_dropout_clients: list[int] = doc("secure aggregation: clients that send their masked update, then do not "
                                            "answer the unmasking request (in faults.rounds)", [])
    unmask_dropout_prob: float = doc("secure aggregation: probability that a client drops after masking (seeded)", 0.0)

    def __post_init__(self) -> None:
        for name in ("error_prob", "nan_prob", "dropout_prob", "straggler_fraction", "unmask_dropout_prob"):
            v = getattr(self, name)
            require(0 <= v <= 1, f"faults.{name}", f"expected a probability in [0, 1], got {v}")
        require(0 < self.straggler_speed <= 1, "faults.straggler_speed", f"expected in (0, 1], got {self.straggler_speed}")

    def _draw(self, client_id: int, rnd: int, kind: str) -> float:
        import numpy as np  # noqa: PLC0415  (config stays import-light)

        return float(np.random.default_rng([rnd, client_id, {"error": 1, "nan": 2, "unmask": 3}[kind], 4242]).random())

    def fires(self, client_id: int, rnd: int, kind: str) -> bool:
        """Whether fault ``kind`` ("error", "nan" or "unmask") hits ``client_id`` in round ``rnd``."""
        ids = {"nan": self.nan_clients, "error": self.error_clients, "unmask": self.unmask_dropout_clients}[kind]
        if client_id in ids and (not self.rounds or rnd in self.rounds):
            return True
        prob = {"nan": self.nan_prob, "error": self.error_prob, "unmask": self.unmask_dropout_prob}[kind]
        return prob > 0 and self._draw(client_id, rnd, kind) < prob


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str = doc("run name; run files go to <output.dir>/<name>/<mode>/", "run")
    mode: Literal["federated", "centralized", "local"] = doc("what `fedllm run` trains", "federated")
    seed: int = doc("seed for partition, sampling and training", 0)
    model: ModelConfig = doc("base model", ModelConfig())
    lora: LoraConfig = doc("LoRA adapter", LoraConfig())
    data: DataConfig = doc("dataset", dataclasses.MISSING)
    partition: PartitionConfig = doc("split across clients", PartitionConfig())
    federation: FederationConfig = doc("federated loop", FederationConfig())
    train: TrainConfig = doc("client training", TrainConfig())
    eval: EvalConfig = doc("evaluation", EvalConfig())
    output: OutputConfig = doc("run directory", OutputConfig())
    server: ServerConfig = doc("server optimizer", ServerConfig())
    robust: RobustConfig = doc("robust aggregation", RobustConfig())
    selection: SelectionConfig = doc("client selection", SelectionConfig())
    hierarchy: HierarchyConfig = doc("hierarchical (regional) aggregation", HierarchyConfig())
    attack: AttackConfig = doc("simulated attackers (studies, tests)", AttackConfig())
    privacy: PrivacyConfig = doc("differential privacy and secure aggregation", PrivacyConfig())
    compression: CompressionConfig = doc("update compression", CompressionConfig())
    prune: PruneConfig = doc("sparse subnetworks (vision)", PruneConfig())
    checkpoint: CheckpointConfig = doc("checkpoints for --resume", CheckpointConfig())
    faults: FaultsConfig = doc("injected client faults and availability", FaultsConfig())

    def __post_init__(self) -> None:
        require(bool(self.name.strip()) and not any(c in self.name for c in "/\\\0")
               and self.name not in (".", "..") and len(self.name.encode("utf-8", "replace")) <= 200,
               "name", f"expected a plain folder name (no / or \\, at most 200 bytes), got {_show(self.name)}")
        require(0 <= self.seed < 2**32, "seed", f"expected an integer in [0, 2**32), got {self.seed}")
        require(self.federation.min_clients <= self.partition.num_clients, "federation.min_clients",
               f"expected <= partition.num_clients ({self.partition.num_clients}), got {self.federation.min_clients}")
        for kind in ("nan_clients", "error_clients", "unmask_dropout_clients"):
            for c in getattr(self.faults, kind):
                require(0 <= c < self.partition.num_clients, f"faults.{kind}",
                       f"client ids must be in [0, {self.partition.num_clients}), got {c}")
        for rule in COMPATIBILITY:
            problem = rule(self)
            if problem is not None:
                raise RecipeError(*problem)

    @property
    def clients_per_round(self) -> int:
        """m = max(1, floor(fraction * K)): clients sampled each round (McMahan et al.'s C*K)."""
        return max(1, math.floor(self.federation.fraction * self.partition.num_clients + 1e-9))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- compatibility
# Each rule looks at a whole recipe and returns (field, reason) when a combination cannot work.
# ``tests/test_compatibility.py`` walks the matrix of algorithm x aggregator x privacy x ... .

Problem = tuple[str, str] | None


def _task_data(r: Recipe) -> Problem:
    vision_data = r.data.builtin == "fashion_mnist" or r.data.root is not None
    if r.model.task == "vision" and not vision_data:
        return "data", f"vision model {r.model.preset!r} needs image data: data.builtin: fashion_mnist (or data.root)"
    if r.model.task == "lm" and vision_data:
        return "data.builtin", f"language model {r.model.preset!r} needs text data, not images"
    if r.model.task == "lm" and r.partition.method in ("dirichlet", "natural", "shards") and r.partition.column is None:
        return "partition.column", f"method {r.partition.method!r} needs a column name"
    return None


def _lm_only(r: Recipe) -> Problem:
    t, default = r.train, TrainConfig()
    for knob in ("grad_accum", "gradient_checkpointing", "precision", "schedule", "head_positions", "length_bucketing",
                 "devices"):
        if r.model.task == "vision" and getattr(t, knob) != getattr(default, knob):
            return f"train.{knob}", f"implemented for the language-model client; expected {getattr(default, knob)!r} here"
    if r.privacy.dpsgd and t.grad_accum > 1:
        return "train.grad_accum", "DP-SGD's per-example clip and noise are per optimizer step: use grad_accum: 1"
    if r.privacy.dpsgd and t.precision == "bf16":
        return "train.precision", "DP-SGD's per-example gradients (Opacus) train on the exact fp32 path: use 32"
    if r.model.task == "vision" and r.eval.client_holdout > 0:
        return "eval.client_holdout", "per-client held-out evaluation is implemented for language models"
    if r.model.task == "vision" and r.data.validation_fraction > 0:
        return "data.validation_fraction", "the validation split is implemented for language models"
    if r.eval.patience is not None and r.data.validation_fraction <= 0:
        return "eval.patience", "early stopping watches val_loss: set data.validation_fraction > 0 (e.g. 0.1)"
    if r.eval.patience is not None and r.federation.engine == "flower":
        return "eval.patience", "early stopping is implemented for the in-process engine (federation.engine: inprocess)"
    if r.model.task == "vision" and r.federation.lora_aggregation != "factorwise":
        return "federation.lora_aggregation", "LoRA aggregation modes need a LoRA model (vision models have no adapters)"
    return None


def _vision_only(r: Recipe) -> Problem:
    if r.model.task == "lm":
        if r.prune.method != "none":
            return "prune.method", "pruning masks are implemented for the vision baselines only"
        if r.prune.init != "none":
            return "prune.init", "the isometric init acts on the vision baselines' weight matrices only"
        if r.eval.targets:
            return "eval.targets", "accuracy targets need a classifier (a vision model)"
        if r.attack.kind in ("label_flip", "backdoor"):
            return "attack.kind", f"{r.attack.kind} needs class labels (a vision model); use sign_flip, scale or noise"
        if r.data.open_data:
            return "data.open_data", "open (unlabeled) data is a vision setting"
    return None


def _aggregator(r: Recipe) -> Problem:
    f, rob, m = r.federation, r.robust, r.clients_per_round
    if f.algorithm == "fednova" and f.lora_aggregation == "svd":
        return "federation.lora_aggregation", "FedNova normalizes each delta by its steps; svd re-factorizes products: use factorwise or frozen_a"
    if f.algorithm == "fednova" and rob.aggregator != "mean":
        return "robust.aggregator", "FedNova is itself the aggregator (deltas normalized by local steps); use mean"
    if rob.aggregator != "mean" and f.lora_aggregation == "svd":
        return "federation.lora_aggregation", "svd LoRA aggregation averages products; robust aggregators pick coordinates"
    if rob.aggregator == "bulyan" and m < 4 * rob.byzantine + 3:
        return "robust.byzantine", (f"Bulyan needs clients per round >= 4f + 3 = {4 * rob.byzantine + 3}, "
                                    f"got {m} (fraction x num_clients)")
    if rob.aggregator in ("krum", "multi_krum") and m < krum_min_updates(rob.byzantine):
        return "robust.byzantine", (f"Krum needs clients per round >= 2f + 3 = {krum_min_updates(rob.byzantine)}, "
                                    f"got {m} (fraction x num_clients)")
    if rob.aggregator == "multi_krum" and rob.multi is not None and rob.multi > m:
        return "robust.multi", f"expected <= clients per round ({m}), got {rob.multi}"
    if f.min_clients > m:
        return "federation.min_clients", f"expected <= clients per round ({m}); no round could ever be applied"
    if r.selection.method == "power_of_choice" and r.selection.candidates is not None and r.selection.candidates < m:
        return "selection.candidates", f"expected >= clients per round ({m}), got {r.selection.candidates}"
    return None


def he_problem(secure_aggregation: bool) -> str | None:
    """Why ``privacy.secagg_scheme: he`` cannot run: secure aggregation off, or TenSEAL not installed."""
    import importlib.util  # noqa: PLC0415

    if not secure_aggregation:
        return "he is a secure-aggregation scheme; set privacy.secure_aggregation: true"
    if importlib.util.find_spec("tenseal") is None:
        return "he needs TenSEAL; install it with pip install 'fedllm[he]' (tenseal==0.3.16)"
    return None


def _privacy(r: Recipe) -> Problem:
    p, f = r.privacy, r.federation
    if p.dpsgd and f.algorithm in ("fedprox", "scaffold"):
        return ("privacy.dpsgd", f"Opacus rebuilds each per-sample gradient, so {f.algorithm}'s "
                "gradient term would be lost; use gradualdiff, fedavg or fednova with DP-SGD")
    if p.secagg_scheme == "he" and (why := he_problem(p.secure_aggregation)):
        return "privacy.secagg_scheme", why
    if p.secure_aggregation:
        if r.robust.aggregator != "mean":
            return ("privacy.secure_aggregation", f"robust aggregator {r.robust.aggregator!r} needs individual "
                    "updates, but secure aggregation shows the server only their sum")
        if f.algorithm == "fednova":
            return "privacy.secure_aggregation", "FedNova reweights individual updates; the server sees only the sum"
        if f.lora_aggregation == "svd":
            return "privacy.secure_aggregation", "svd LoRA aggregation multiplies individual factors; the server sees only the sum"
        if r.compression.codec not in ("none", "fp16"):
            return ("compression.codec", "masked updates are uniform integers mod 2^b: they cannot be quantized "
                    "or sparsified after masking; use none or fp16 with secure aggregation")
        if r.hierarchy.regions:
            return "privacy.secure_aggregation", "hierarchical aggregation with secure aggregation is not supported"
        if p.adaptive_clip:
            return "privacy.adaptive_clip", "adaptive clipping needs each update's norm; secure aggregation hides it"
        if f.is_weighted:
            return "federation.weighted", "secure aggregation sums updates uniformly; set federation.weighted: false"
    if p.enabled:
        if r.robust.aggregator != "mean" or f.algorithm == "fednova":
            return "privacy.dp", "DP noise is calibrated to the clipped uniform mean; use robust.aggregator: mean, not FedNova"
        if f.is_weighted:
            return "federation.weighted", "DP sensitivity C/K holds for the unweighted mean; set federation.weighted: false"
        if p.dp == "client" and p.adaptive_clip:
            return "privacy.adaptive_clip", "adaptive clipping needs the server to see update norms (dp: server)"
        if r.hierarchy.regions:
            return "privacy.dp", "client-level DP with hierarchical aggregation is not supported"
        if r.selection.method == "poisson" and (p.dp == "client" or p.secure_aggregation):
            return ("selection.method", "poisson sampling is wired to server-side DP (a fixed denominator fraction*K "
                    "on the mean); with dp: client or secure aggregation use selection.method: uniform")
        if r.selection.method == "power_of_choice":
            return ("selection.method", "power_of_choice picks clients by their local losses, which depend on their "
                    "data outside the DP mechanism (no accountant bounds that); use uniform, round_robin or importance")
        if (p.accountant == "prv" and r.selection.method == "uniform"
                and r.clients_per_round < r.partition.num_clients):
            return ("privacy.accountant", "the PRV accountant models Poisson sampling, but the uniform sampler draws "
                    "a fixed-size sample without replacement (accounted with RDP); use accountant: rdp")
        if f.lora_aggregation == "svd":
            return "federation.lora_aggregation", "svd re-factorization is not covered by the DP clipping; use factorwise or frozen_a"
    return None


def _adapters(r: Recipe) -> Problem:
    """Heterogeneous ranks and personal adapters: LoRA models, and the combinations they are defined for."""
    ranks, f = r.lora.client_ranks, r.federation
    if ranks is not None:
        if r.model.task == "vision":
            return "lora.client_ranks", "heterogeneous ranks need a LoRA model (vision models have no adapters)"
        if len(ranks) != r.partition.num_clients:
            return "lora.client_ranks", (f"expected one rank per client ({r.partition.num_clients}, "
                                         f"partition.num_clients), got {len(ranks)}")
        if f.algorithm == "scaffold":
            return "lora.client_ranks", "SCAFFOLD's correction would move the slots beyond a client's rank"
        if r.hierarchy.regions:
            return "lora.client_ranks", "heterogeneous ranks with hierarchical aggregation are not supported"
    if f.personalize != "none":
        if r.model.task == "vision":
            return "federation.personalize", "shared_a personalizes LoRA factors (vision models have no adapters)"
        if r.eval.client_holdout <= 0:
            return "eval.client_holdout", ("federation.personalize evaluates each personal model on its own "
                                           "client's held-out data; set eval.client_holdout > 0 (e.g. 0.2)")
        if f.lora_aggregation != "factorwise":
            return "federation.lora_aggregation", (f"{f.lora_aggregation} with personalize: shared_a (A is what the "
                                                   "clients share; frozen A would share nothing, svd mixes A with "
                                                   "the personal B); use factorwise")
        if r.hierarchy.regions:
            return "federation.personalize", "personal adapters with hierarchical aggregation are not supported"
    return None


def _collusion(r: Recipe) -> Problem:
    """ALIE and IPM attackers read the round's honest updates, which must then exist in one place."""
    if r.attack.kind in ("alie", "ipm"):
        for name, on in (("privacy.dp", r.privacy.dp == "client"), ("privacy.secure_aggregation", r.privacy.secure_aggregation),
                         ("compression.codec", r.compression.codec != "none"), ("hierarchy.regions", bool(r.hierarchy.regions))):
            if on:
                return name, (f"attack.kind {r.attack.kind} simulates attackers who see the round's honest raw "
                              "updates; with this setting they never exist in one place")
    return None


def _hierarchy(r: Recipe) -> Problem:
    h = r.hierarchy
    if h.regions:
        if h.regions > r.partition.num_clients:
            return "hierarchy.regions", f"expected <= partition.num_clients ({r.partition.num_clients}), got {h.regions}"
        if r.federation.algorithm in ("scaffold", "fednova"):
            return "hierarchy.regions", f"{r.federation.algorithm} corrects against the global model each round; use gradualdiff, fedavg or fedprox"
    return None


def _topology(r: Recipe) -> Problem:
    """Gossip and IFCA (:mod:`fedllm.federation.gossip`, :mod:`fedllm.federation.clustered`): what they
    run, and one line for each piece that has no meaning without one server model (or one model)."""
    f, p, n = r.federation, r.privacy, r.partition.num_clients
    gossip, clustered = f.topology == "gossip", f.clusters > 1
    if not (gossip or clustered):
        return None
    what = "gossip" if gossip else "clustered FL (federation.clusters > 1)"
    if gossip and clustered:
        return "federation.clusters", "gossip has no server to hold cluster models; use clusters: 1 with gossip"
    if isinstance(f.graph, list) and any(c >= n for edge in f.graph for c in edge):
        return "federation.graph", f"an edge names a client id >= partition.num_clients ({n})"
    if gossip and isinstance(f.graph, list):  # connected, or the models could never agree
        seen, todo = {0}, [0]
        while todo:
            i = todo.pop()
            for j in {b if a == i else a for a, b in f.graph if i in (a, b)} - seen:
                seen.add(j)
                todo.append(j)
        if len(seen) < n:
            cut = sorted(set(range(n)) - seen)[:8]
            return "federation.graph", (f"clients {cut} have no path to client 0; gossip over a graph that is "
                                        "not connected never reaches consensus")
    for name, on, why in (
        ("federation.algorithm", f.algorithm in ("scaffold", "fednova") or (gossip and f.algorithm == "fedavg"),
         "its control variates / step normalization / example weights are defined against one server mean"),
        ("federation.weighted", gossip and f.weighted is True, "Metropolis weights fix each neighbour's share"),
        ("server.optimizer", r.server.optimizer != "none", "there is no single server model to step"),
        ("privacy.dp", p.dp != "none", "the DP mechanism and its ledger are calibrated to one server mean"),
        ("privacy.secure_aggregation", p.secure_aggregation,
         "masking hides individual models, which gossip neighbours and the cluster choice need"),
        ("privacy.dpsgd", p.dpsgd, "the per-client DP-SGD ledger is kept by the one-model server"),
        ("privacy.audit.canaries", p.audit.canaries > 0, "the audit scores canaries at the one-model server"),
        ("robust.aggregator", r.robust.aggregator != "mean" or r.robust.max_norm is not None,
         "robust rules are written for one server aggregate"),
        ("compression.codec", r.compression.codec != "none", "updates are exchanged uncompressed here"),
        ("attack.kind", r.attack.kind != "none", "attacks are simulated on the one-model server's uplink"),
        ("hierarchy.regions", bool(r.hierarchy.regions), "regions are another topology"),
        ("federation.personalize", f.personalize != "none", "personal B factors belong to the one-model server"),
        ("lora.client_ranks", r.lora.client_ranks is not None, "models of different ranks cannot be averaged"),
        ("federation.lora_aggregation", f.lora_aggregation == "svd", "svd re-factorizes one server mean"),
        ("federation.fraction", gossip and f.fraction < 1, "in gossip every client trains every round; use 1.0"),
        ("selection.method", gossip and r.selection.method != "uniform", "in gossip every client trains"),
        ("faults.dropout_prob", gossip and (r.faults.dropout_prob > 0 or r.faults.straggler_fraction > 0),
         "availability is drawn by the server, which gossip has not"),
        ("federation.clusters", clustered and f.clusters > n, f"expected <= partition.num_clients ({n})"),
        ("eval.client_holdout", clustered and r.eval.client_holdout <= 0,
         "clustered FL is judged per client, under its cluster's model: set eval.client_holdout > 0 (e.g. 0.2)"),
    ):
        if on:
            return name, f"{what} cannot run this ({why})"
    return None


def flower_problem(r: Recipe) -> Problem:
    """What the Flower engine (simulation or deployment) cannot run, whatever ``federation.engine`` says.

    On Flower the sites apply their own client DP noise and codec (``Uplink.site_part``), so what
    the coordinator would otherwise do to each client's raw update cannot happen there.
    """
    on_site = r.privacy.dp == "client" or r.compression.codec != "none"
    unsupported = [(name, why) for name, on, why in (
        ("privacy.secure_aggregation", r.privacy.secure_aggregation, "masking is not run on the sites yet"),
        ("hierarchy.regions", bool(r.hierarchy.regions), "regional servers are not modelled on Flower yet"),
        ("selection.method", r.selection.method != "uniform", "only uniform client sampling is wired to Flower"),
        ("privacy.dpsgd", r.privacy.dpsgd, "a site's DP-SGD noise is seeded from the recipe, which the coordinator knows"),
        ("eval.client_holdout", r.eval.client_holdout > 0, "a client's held-out slice stays on its site"),
        ("lora.client_ranks", r.lora.client_ranks is not None, "sites would count their padded update's bytes"),
        ("federation.personalize", r.federation.personalize != "none",
         "the personal B factors are kept by the in-process server, not on the sites"),
        ("federation.topology", r.federation.topology == "gossip", "gossip clients average with each other, "
         "and Flower's sites only ever talk to the server"),
        ("federation.clusters", r.federation.clusters > 1, "the cluster choice scores k models on each site's "
         "training data, which the Flower apps do not do"),
        ("attack.kind", r.attack.kind not in ("none", "label_flip"),
         "a simulated attack would change updates at the coordinator, after the sites noised and encoded them"),
        ("federation.algorithm", r.federation.algorithm == "scaffold" and on_site,
         "SCAFFOLD's control is computed from the raw update, which a site that noises or encodes never sends"),
    ) if on]
    if unsupported:
        name, why = unsupported[0]
        return name, f"the Flower engine cannot run this ({why}); use engine: inprocess"
    return None


def _engine(r: Recipe) -> Problem:
    return flower_problem(r) if r.federation.engine == "flower" else None


def fused_problem(r: Recipe) -> Problem:
    """What ``federation.fused_clients`` cannot train in one pass (:mod:`fedllm.client.fused`)."""
    if not r.federation.fused_clients:
        return None
    t = r.train
    for name, on, reason in (
        ("model.task", r.model.task != "lm", "fusing routes each example through its client's LoRA factors; "
         "vision models have none"),
        ("privacy.dpsgd", r.privacy.dpsgd, "DP-SGD clips per-example gradients through Opacus' hooks on one "
         "adapter; train the clients one after another"),
        ("lora.method", r.lora.method != "lora", "DoRA's magnitude vector is not routed per client"),
        ("lora.target_modules", bool({"lm_head", "embed_tokens"} & set(r.lora.target_modules)),
         "only the decoder's linear layers are routed per client"),
        ("train.gradient_checkpointing", t.gradient_checkpointing, "recomputing activations would redraw "
         "the clients' dropout masks from the wrong streams"),
        ("train.precision", t.precision != "32", "the fused loop trains on the exact fp32 path (precision: 32)"),
        ("federation.engine", r.federation.engine != "inprocess", "Flower's clients train on their own sites"),
        ("output.loggers", bool(r.output.loggers), "step losses are logged per client fit; a fused fit has none"),
    ):
        if on:
            return name, f"federation.fused_clients cannot fuse this ({reason})"
    return None


def ddp_problem(r: Recipe) -> Problem:
    """What ``train.devices`` > 1 cannot split across processes (:mod:`fedllm.client.ddp`)."""
    if r.train.devices <= 1:
        return None
    for name, on, reason in (
        ("privacy.dpsgd", r.privacy.dpsgd, "DP-SGD clips each example's gradient and draws Poisson batches in one "
         "process (Opacus); use devices: 1"),
        ("federation.fused_clients", r.federation.fused_clients, "a fused pass trains several clients on one "
         "process; use one of the two"),
    ):
        if on:
            return name, f"train.devices {r.train.devices} cannot run this ({reason})"
    return None


def _excludes_something(r: Recipe) -> Problem:
    """A robust aggregator that cannot exclude anything at this round size is a mean in disguise."""
    rob, m = r.robust, r.clients_per_round
    if rob.aggregator == "trimmed_mean" and math.floor(rob.trim_ratio * m) == 0:
        return "robust.trim_ratio", (f"trimmed mean cuts floor({rob.trim_ratio:g} x {m}) = 0 of the {m} updates per "
                                     f"round from each end: it would exclude nothing; expected >= {1 / m:.3g}")
    return None


def _audit(r: Recipe) -> Problem:
    """``privacy.audit``: example canaries are text records; canary clients join a plain clipped mean."""
    a, f = r.privacy.audit, r.federation
    if not a.canaries:
        return None
    if any(not 0 <= c < r.partition.num_clients for c in a.clients or []):
        return "privacy.audit.clients", f"client ids must be in [0, {r.partition.num_clients})"
    if f.engine != "inprocess":
        return "privacy.audit", "the audit scores what the in-process server saw; use federation.engine: inprocess"
    if a.unit(r.privacy.dp) == "example":
        if r.model.task != "lm" or r.data.streaming:
            return "privacy.audit.kind", "example canaries are text records of a language model's (non-streamed) data"
        return None
    if (r.robust.aggregator != "mean" or f.algorithm == "fednova" or r.hierarchy.regions
            or f.lora_aggregation == "svd" or f.personalize != "none"):
        return ("privacy.audit.kind", "canary clients join the round's plain mean: use robust.aggregator: mean, no "
                "FedNova, hierarchy, svd LoRA aggregation or personalization")
    return None


def _diversity(r: Recipe) -> Problem:
    """Diversity sampling reads the clients' label histograms: a classifier's labels, no DP, one server."""
    if r.selection.method != "diversity":
        return None
    if r.model.task != "vision":
        return "selection.method", "diversity covers the clients' class labels (a vision model); use uniform"
    if r.privacy.enabled or r.privacy.dpsgd:
        return ("selection.method", "diversity picks clients by their label histograms, which depend on their data "
                "outside the DP mechanism (the accountant assumes a data-independent draw); use uniform or poisson")
    if r.federation.topology == "gossip" or r.federation.clusters > 1:
        return "selection.method", "diversity sampling is wired to the one-server topology; use uniform"
    return None


COMPATIBILITY = (_task_data, _lm_only, _vision_only, _aggregator, _privacy, _adapters, _collusion, _hierarchy,
                 _engine, _excludes_something, fused_problem, _topology, _audit,
                 ddp_problem, _diversity)


# ----------------------------------------------------------------------------- generic loading


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted as floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(where, f"expected a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except RecipeError:
                continue
        raise RecipeError(where, f"expected {_type_name(tp)}, got {_show(value)}")
    if origin is Literal:
        if _is_number(value) and value not in typing.get_args(tp) and str(value) in typing.get_args(tp):
            return str(value)  # `precision=32` (an override or unquoted YAML) reads 32 as an int: its text names it
        if value in typing.get_args(tp):
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise RecipeError(where, f"expected {_type_name(tp)}, got {_show(value)}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(where, f"expected {_type_name(tp)}, got {_show(value)}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
    elif tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return _coerce(float(value), tp, where)  # `1e-4`: YAML 1.1 reads it as a string; users write it so
    elif tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e300 else math.inf  # float(10**400) would overflow
        if not math.isfinite(number):
            raise RecipeError(where, f"expected a finite number, got {_show(value)}")
        return number
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp in (int, str) and isinstance(value, tp) and not isinstance(value, bool):
        return value
    raise RecipeError(where, f"expected {_type_name(tp)}, got {_show(value)}")


def _is_number(value: Any) -> bool:
    """An int or float scalar (not a bool): what YAML makes of an unquoted ``32`` or ``0.5``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-4, 2E5, .5e3: no dot needed


def build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, naming unknown keys and the nearest valid one."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {'.'.join(filter(None, [where, near[0]]))!r}?" if near else ""
            raise RecipeError(path, f"unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f"{where}.{name}" if where else name, "required field is missing")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (TypeError, ValueError) as exc:  # a check outside the RecipeError helpers
        raise RecipeError(where or cls.__name__, str(exc)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(text, "expected an override of the form group.field=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(text, "expected an override of the form group.field=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        value = raw  # not YAML: keep the text (the field's type check then names it)
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to a raw recipe mapping (returns a new mapping)."""
    out = copy.deepcopy(values)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(".".join(path), f"{part!r} is not a group")
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file into a mapping, with one-line errors for missing or malformed files."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(str(path), "recipe file not found")
    try:  # a FIFO or a device is refused unread (NotRegularFile, an OSError), never waited on
        values = yaml.safe_load(read_regular_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"{path}{line}", f"not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except UnicodeDecodeError:
        raise RecipeError(str(path), "not a UTF-8 text file") from None
    except (ValueError, OverflowError) as exc:  # e.g. an invalid date or a 5,000-digit integer
        raise RecipeError(str(path), f"not valid YAML ({exc})") from None
    except RecursionError:
        raise RecipeError(str(path), "not valid YAML (nested too deeply)") from None
    except OSError as exc:
        raise RecipeError(str(path), f"could not be read ({exc.strerror or exc})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(str(path), f"expected a mapping of recipe groups, got {type(values).__name__}")
    return values


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe. Relative data/model paths in the file resolve from the
    recipe's folder, those of ``overrides`` from the working directory (:mod:`fedllm.recipe_paths`)."""
    try:
        values = read_yaml(path)
        anchored = recipe_paths.anchor(values, Path(path).resolve().parent)
        values = apply_overrides(values, overrides or [])
        anchored.update(recipe_paths.anchor(values, Path.cwd(), command_line=True))  # still relative: typed here
        if (problem := recipe_paths.missing(values, anchored)) is not None:
            raise RecipeError(*problem)
        values.setdefault("name", Path(path).stem)
        return build(Recipe, values)
    except RecursionError:
        raise RecipeError(str(path), "a value is nested too deeply") from None


def explain(obj: Any, prefix: str = "") -> list[str]:
    """One line per field of a (resolved) recipe: ``group.field = value  # doc``."""
    lines = []
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            lines.append(f"{name}:  # {f.metadata.get('doc', '')}")
            lines += explain(value, name + ".")
        else:
            lines.append(f"{'  ' if prefix else ''}{name} = {_show(value, 40)}  # {f.metadata.get('doc', '')}")
    return lines


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (written to each run directory as config.yaml)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
