"""The recipe groups: one frozen dataclass per top-level YAML key, one line per field with its doc and
default, range checks in ``__post_init__``. :class:`Recipe` holds them and, once built, runs the
rules between groups (:mod:`fedllm.config.rules`)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedllm.config.fields import RecipeError, _show, doc, require

log = logging.getLogger(__name__)


VISION_PRESETS = ("lenet300100", "cnn", "resnet")
# The rules between groups (fedllm.config.rules registers them when fedllm.config is imported); every
# Recipe runs them once its groups are built.
RULES: list[Callable[[Recipe], tuple[str, str] | None]] = []


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
        for rule in RULES:
            problem = rule(self)
            if problem is not None:
                raise RecipeError(*problem)

    @property
    def clients_per_round(self) -> int:
        """m = max(1, floor(fraction * K)): clients sampled each round (McMahan et al.'s C*K)."""
        return max(1, math.floor(self.federation.fraction * self.partition.num_clients + 1e-9))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
