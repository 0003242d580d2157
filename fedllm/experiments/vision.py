"""A vision experiment: Fashion-MNIST, a small classifier, and (optionally) a pruned subnetwork.

Satisfies :class:`fedllm.experiments.base.Experiment`, as :class:`~fedllm.experiments.lm.LMExperiment`
does, so the federated, centralized and local modes, the server and the CLI run it unchanged:

- ``data``: the 60k training images minus ``data.open_data`` unlabeled images held out for the
  server (HP-FL's open data), optionally subsampled to ``data.max_examples``, partitioned by
  ``partition`` (``shards``: sort by label, cut ``K · shards_per_client`` shards, hand out at
  random; ``dirichlet``: label shares ~ Dir(α); the class label is the column). Examples are
  indices into the 60k training set. Evaluation uses a seeded subset of ``data.eval_size`` of the
  10k test images (all of them when ``eval_size >= 10000``; the vision recipes set 10000).
- the trainable state is every model parameter (the models have no buffers).
- ``prune.method`` builds a mask at construction: ``hpfl`` (DAE on the open data, iterative
  magnitude pruning with rewinding: :func:`fedllm.algorithms.hpfl.lottery_ticket`), ``snip``
  (connection sensitivity on one mini-batch of ``prune.snip_batch`` pooled training images) or
  ``random`` (same remaining rate). Clients train and exchange only the kept weights:
  :meth:`payload_bytes` counts the surviving values, ``mask_bytes`` the one-time mask download.
  ``prune.init: isometry`` then solves every masked weight for layerwise dynamical isometry (Lee
  et al. 2020, :mod:`fedllm.algorithms.signal`) before training; ``runtime_info()["signal"]``
  (``machine.signal`` in ``summary.json``) records the per-layer Jacobian singular values.
- training: ``train.optimizer`` (``auto`` = SGD for vision; or AdamW) with ``train.lr``,
  ``momentum``, ``weight_decay`` (its default 0.001 applies; the vision recipes set 0), batch ``train.batch_size``; ``train.max_grad_norm`` clips the gradient
  norm as for LMs (its default 0.3 too: the vision recipes set 0); ``warmup_ratio`` is LM-only.
- ``attack.kind: label_flip``: the attacking clients (the server's own seeded choice) train on
  y ↦ 9 − y; ``backdoor``: they train on a share of trigger-stamped images relabelled to the target
  (:mod:`fedllm.algorithms.backdoor`; the server's uplink boosts their update), and every evaluation
  reports ``backdoor_success``. ``privacy.dpsgd``: each client trains with Opacus DP-SGD; its cumulative ε over the
  rounds it took part in is reported as ``update.metrics["dpsgd_epsilon"]``.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from fedllm.algorithms.attacks import Attack, attackers, flip_labels
from fedllm.algorithms.backdoor import backdoor_success, poison
from fedllm.algorithms.drift import DriftTerm
from fedllm.algorithms.hpfl import HPFLConfig, lottery_ticket
from fedllm.algorithms.prune import (
    Mask,
    apply_mask,
    encode_mask,
    masked_values,
    random_mask,
    remaining_rate,
    snip_mask,
    snip_scores,
)
from fedllm.algorithms.signal import isometric_init, signal_report
from fedllm.client.evaluate import EvalResult
from fedllm.client.fit import FitStats
from fedllm.client.vision import (
    VisionClassifier,
    VisionTrainConfig,
    evaluate_classifier,
    fit_classifier,
    make_optimizer,
    vision_loader,
)
from fedllm.config import Recipe, RecipeError
from fedllm.data.partition import partition
from fedllm.data.vision import DEFAULT_ROOT, NUM_CLASSES, load_fashion_mnist, split_open_data
from fedllm.experiments.base import ClientFault, FitJob, fit_each, round_seed
from fedllm.models.llm import pick_device
from fedllm.models.quant import kernel_info
from fedllm.models.vision import build_vision_model
from fedllm.types import ClientUpdate, StateDict, serialized_bytes

log = logging.getLogger(__name__)

TEST_SIZE = 10_000


class VisionSplits:
    """Fashion-MNIST split for one recipe: client partitions, server open data, test subset."""

    def __init__(self, recipe: Recipe) -> None:
        d, seed = recipe.data, recipe.seed
        self.images = load_fashion_mnist(d.root or DEFAULT_ROOT)
        labeled, self.open_idx = split_open_data(self.images, d.open_data, seed)
        if d.max_examples is not None and d.max_examples < len(labeled):
            pick = np.random.default_rng([seed, 1]).permutation(len(labeled))[: d.max_examples]
            labeled = np.sort(labeled[pick])
        self.pool = labeled
        labels = self.images.train_y[torch.as_tensor(labeled)].tolist()
        parts = partition(len(labeled), labels, recipe.partition, seed)
        self.clients: list[list[int]] = [labeled[np.asarray(p, dtype=np.int64)].tolist() for p in parts]
        n_test = len(self.images.test_y)
        if d.eval_size >= n_test:
            self.test_idx = np.arange(n_test)
        else:
            self.test_idx = np.sort(np.random.default_rng([seed, 2]).permutation(n_test)[: d.eval_size])
        self.method = recipe.partition.method

    @property
    def train_examples(self) -> list[int]:
        """All clients' training indices pooled (centralized mode)."""
        return sorted(i for part in self.clients for i in part)

    def client_examples(self, k: int) -> list[int]:
        return self.clients[k]

    @property
    def stats(self) -> dict:
        sizes = [len(p) for p in self.clients]
        return {"train": len(self.pool), "open_data": len(self.open_idx), "eval": len(self.test_idx),
                "clients": len(sizes), "min_client": min(sizes), "max_client": max(sizes),
                "mean_client": statistics.fmean(sizes)}

    def label_histograms(self) -> dict[int, list[int]]:
        """client id -> its examples per class (diversity sampling, ``selection.method: diversity``)."""
        return {k: torch.bincount(self.images.train_y[torch.as_tensor(p, dtype=torch.long)],
                                  minlength=NUM_CLASSES).tolist() for k, p in enumerate(self.clients)}

    def partition_json(self) -> dict:
        """client id -> training-set indices, the server's open-data indices, the test indices evaluated."""
        return {"source": "fashion_mnist", "method": self.method,
                "clients": {str(k): p for k, p in enumerate(self.clients)},
                "open_data": self.open_idx.tolist(), "eval": self.test_idx.tolist(), "test_size": len(self.test_idx)}

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(self.test_idx)
        return self.images.test_x[idx], self.images.test_y[idx]

    def train_tensors(self, examples) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(list(examples), dtype=torch.long)
        return self.images.train_x[idx], self.images.train_y[idx]


class VisionExperiment:
    """Fashion-MNIST + LeNet-300-100 / CNN / ResNet, trained through :class:`VisionClassifier`."""

    uplink_on_site = False  # in-process: the server's Uplink plays every client's part

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        # (DP-SGD with FedProx/SCAFFOLD is refused by the recipe's own rules: fedllm.config)
        self.data = VisionSplits(recipe)
        torch.manual_seed(recipe.seed)
        self.model = build_vision_model(recipe.model.preset)
        self.mask: Mask | None = self._build_mask()  # on the CPU, before the model moves
        self.mask_bytes = len(encode_mask(self.mask)) if self.mask is not None else 0
        state = {k: v.detach().cpu().clone() for k, v in self.model.named_parameters()}
        device = pick_device(recipe.model)  # `auto` picks CUDA when present, as for LMs
        self.model.to(device)  # once: the trainer's strategy never moves it (fedllm.client.strategy)
        self.accelerator = "gpu" if device == "cuda" else "cpu"
        masked = apply_mask(state, self.mask) if self.mask is not None else state
        self.initial_state, self.signal = self._signal_init(masked)
        self.prune_stats = {"remaining": remaining_rate(self.mask) if self.mask is not None else 1.0,
                            "mask_bytes": self.mask_bytes}
        a = recipe.attack
        self.flippers = (attackers(range(recipe.partition.num_clients),
                                   Attack(a.kind, a.fraction, a.scale, a.noise_std, recipe.seed))
                         if a.kind == "label_flip" else set())
        # model replacement: the same seeded clients as the server's uplink boosts (fedllm.federation.build.attack)
        self.backdoors = (attackers(range(recipe.partition.num_clients), Attack(a.kind, a.fraction, seed=recipe.seed))
                          if a.kind == "backdoor" else set())
        self._dp_history: dict[int, list] = {}  # client -> opacus RDP history (sigma, q, steps)
        self.step_callbacks: list = []
        self.test_x, self.test_y = self.data.test_tensors()

    # ------------------------------------------------------------------ pruning at construction

    def _build_mask(self) -> Mask | None:
        pr, seed = self.recipe.prune, self.recipe.seed
        if pr.method == "none":
            return None
        if pr.method == "random":
            return random_mask(dict(self.model.named_parameters()), pr.remaining, seed)
        if pr.method == "snip":
            pool = self.data.train_examples
            pick = np.random.default_rng([seed, 3]).permutation(len(pool))[: pr.snip_batch]
            x, y = self.data.train_tensors([pool[i] for i in pick])
            scores = snip_scores(self.model, x, y, torch.nn.functional.cross_entropy)
            return snip_mask(scores, pr.remaining)
        return self._hpfl_mask()

    def _hpfl_mask(self) -> Mask | None:
        """HP-FL: N_p cycles of DAE pretraining, pruning p = 1 − remaining^(1/N_p), rewinding."""
        pr, d = self.recipe.prune, self.recipe.data
        if d.open_data < 1:
            raise RecipeError("data.open_data", "prune.method: hpfl pre-trains on unlabeled open data; "
                              "expected data.open_data > 0 (the paper holds out 20000 images)")
        open_x = self.data.images.train_x[torch.as_tensor(self.data.open_idx)]
        rate = 1.0 - pr.remaining ** (1.0 / pr.iterations)
        cfg = HPFLConfig(prune_rate=rate, iterations=pr.iterations, dae_epochs=max(1, pr.dae_epochs),
                         lr=pr.dae_lr, seed=self.recipe.seed, rewind_to="none" if pr.pretrain else "init")
        state, mask = lottery_ticket(self.model, open_x, cfg)
        self.model.load_state_dict(state)
        return None if pr.remaining >= 1.0 else mask  # remaining 1: DAE pre-training only, dense

    def _signal_init(self, state: StateDict) -> tuple[StateDict, dict | None]:
        """``prune.init``: the masked init as is, or each masked weight solved for layerwise isometry
        (:func:`fedllm.algorithms.signal.isometric_init`), once, so every client and mode starts
        from it. Returns the initial state and the per-layer Jacobian singular values before (and
        after) for the run files; ``None`` for a dense run with the plain init."""
        pr = self.recipe.prune
        if pr.init == "none":
            return state, (None if self.mask is None else {"init": "none", **signal_report(state, self.mask)})
        iso = isometric_init(state, self.mask, pr.isometry_steps)
        return iso, {"init": "isometry", "steps": pr.isometry_steps, **signal_report(state, self.mask, iso)}

    # ------------------------------------------------------------------ the protocol

    def _train_cfg(self) -> VisionTrainConfig:
        t = self.recipe.train
        return VisionTrainConfig(lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, batch_size=t.batch_size,
                                 optimizer=t.optimizer_for("vision"))

    def fit_many(self, jobs: list[FitJob], rnd: int, on_client=None) -> list[ClientUpdate | Exception]:
        """A round's clients one after another (:func:`~fedllm.experiments.base.fit_each`)."""
        return fit_each(self, jobs, rnd, on_client)

    def fit(self, client_id: int, examples, start: StateDict, rnd: int, steps: int,
            grad_term: DriftTerm | None = None) -> ClientUpdate:
        """SGD for ``steps`` mini-batches of ``examples`` from ``start``; returns Δ = trained − start.

        The batch order is seeded by (seed, round): clients with the same data in the same round
        produce the same update.
        """
        r = self.recipe
        if r.faults.fires(client_id, rnd, "error"):
            raise ClientFault(f"injected failure of client {client_id} in round {rnd}")
        seed = round_seed(r.seed, rnd)
        torch.manual_seed(seed)
        x, y = self.data.train_tensors(examples)
        if client_id in self.flippers:
            y = flip_labels(y, NUM_CLASSES)
        bd_rounds = r.attack.backdoor_rounds
        if client_id in self.backdoors and (bd_rounds is None or rnd in bd_rounds):
            x, y = poison(x, y, r.attack.backdoor_target, r.attack.poison_fraction, [r.seed, rnd, client_id])
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for k, v in start.items():
                params[k].copy_(v)
        cfg = self._train_cfg()
        loader = vision_loader(x, y, cfg.batch_size, shuffle=True, seed=seed)
        metrics: dict[str, float] = {}
        if r.privacy.dpsgd:
            fitted, metrics["dpsgd_epsilon"] = self._fit_dpsgd(client_id, loader, cfg, steps)
            losses, grad_steps = fitted.losses, fitted.grad_steps
        else:
            module = VisionClassifier(self.model, cfg, self.mask, grad_term=grad_term)
            fitted = fit_classifier(module, loader, steps, self.step_callbacks, self.accelerator,
                                    r.train.max_grad_norm)
            losses, grad_steps = fitted.losses, fitted.grad_steps
        delta = {k: p.detach().cpu() - start[k] for k, p in self.model.named_parameters()}
        if r.faults.fires(client_id, rnd, "nan"):
            delta = {k: torch.full_like(v, float("nan")) for k, v in delta.items()}
        finite = losses and all(math.isfinite(v) for v in losses)
        return ClientUpdate(client_id=client_id, delta=delta, num_examples=len(examples), local_steps=len(losses),
                            train_loss=statistics.fmean(losses) if finite else float("nan"),
                            bytes_up=self.payload_bytes(delta), metrics=metrics, grad_steps=grad_steps)

    def _fit_dpsgd(self, client_id: int, loader, cfg: VisionTrainConfig, steps: int) -> tuple[FitStats, float]:
        """Opacus DP-SGD (per-sample clip ``privacy.dpsgd_clip``, noise ``dpsgd_noise``); (fit stats, ε so far)."""
        from fedllm.algorithms.privacy import history_epsilon, make_private_dpsgd  # noqa: PLC0415

        p = self.recipe.privacy
        self.model.train()
        opt = make_optimizer(self.model.parameters(), cfg)  # train.optimizer, as without DP
        gsm, dp_opt, dp_loader, ledger = make_private_dpsgd(self.model, opt, loader, p.dpsgd_noise,
                                                            p.dpsgd_clip, p.delta)
        try:
            module = VisionClassifier(self.model, cfg, self.mask, net=gsm, optimizer=dp_opt)
            fitted = fit_classifier(module, dp_loader, steps, self.step_callbacks, self.accelerator)
        finally:
            gsm._close()  # remove opacus' hooks and per-sample grads: the model is shared by all clients
        history = self._dp_history.setdefault(client_id, [])
        history.extend(ledger.accountant.history)
        return fitted, history_epsilon(history, p.delta)

    def evaluate(self, state: StateDict) -> EvalResult:
        """Test-set cross-entropy and accuracy; perplexity is exp(loss) (capped), no BLEU."""
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for k, v in state.items():
                params[k].copy_(v)
        loss, acc = evaluate_classifier(self.model, self.test_x, self.test_y)
        a = self.recipe.attack
        success = backdoor_success(self.model, self.test_x, self.test_y, a.backdoor_target) if a.kind == "backdoor" else None
        return EvalResult(eval_loss=loss, perplexity=math.exp(min(loss, 700.0)), bleu=None, samples=[],
                          accuracy=acc, backdoor_success=success)

    def evaluate_clients(self, state: StateDict, clients: list[int] | None = None) -> dict[int, float]:
        return {}  # eval.client_holdout is refused for vision recipes (fedllm.config)

    def loss_on(self, state: StateDict, examples) -> float:
        """Mean cross-entropy of ``state`` on training ``examples`` (IFCA's cluster choice)."""
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for k, v in state.items():
                params[k].copy_(v)
        return evaluate_classifier(self.model, *self.data.train_tensors(examples))[0]

    def payload_bytes(self, state: StateDict) -> int:
        """Bytes of one state or delta on the wire: the mask's surviving values only, when pruned."""
        if self.mask is None:
            return serialized_bytes(state)
        return serialized_bytes(masked_values(state, self.mask))

    def runtime_info(self) -> dict:
        """Versions and CPU flags (the classifier has no 4-bit layers: ``linear4bit_layers`` is 0);
        for a pruned or isometric init, ``signal``: per-layer mean/min/max Jacobian singular value
        of the initial state, ``before`` (and ``after``) ``prune.init: isometry``."""
        info = kernel_info(self.model)
        return info if self.signal is None else {**info, "signal": self.signal}

    def save_adapter(self, state: StateDict, path: Path) -> None:
        """``model.safetensors`` (the full parameter state) and, when pruned, ``mask.bin`` (encode_mask)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path / "model.safetensors"))
        if self.mask is not None:
            (path / "mask.bin").write_bytes(encode_mask(self.mask))
