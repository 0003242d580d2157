"""The rules between recipe groups: combinations that cannot work, each refused with one line."""

from __future__ import annotations

import math

from fedllm.config.groups import RULES, Recipe, TrainConfig


def krum_min_updates(byzantine: int, multi: int | None = 1) -> int:
    """Fewest updates Krum can score with f Byzantine clients: K > 2f + 2 (Blanchard et al., 2017);
    multi-Krum also needs K >= m. The one statement of the rule (recipe check, aggregator, server)."""
    return max(2 * byzantine + 3, multi or 1)



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
RULES.extend(COMPATIBILITY)  # Recipe.__post_init__ runs them (fedllm.config imports this module)
