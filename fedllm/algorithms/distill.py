"""Knowledge distillation for asynchronous edge learning: the loss, the teacher memory, the scores.

"Asynchronous Edge Learning using Cloned Knowledge Distillation" (ICLR 2021 submission,
OpenReview MqWHrrIfBMN; the brief's "asynchronous edge learning by cloned knowledge
distillation"): a core model is cloned to an edge, the clone trains on the edge's data, and the
returned clone teaches the core by knowledge distillation (Hinton, Vinyals & Dean, 2015,
"Distilling the Knowledge in a Neural Network") on a small labeled core dataset.

Loss on a core batch (x, y), student z_S = core(x), teachers z_1 … z_K = the models in the
temporal memory (the last M returned edge models; with an ensemble, every clone of each edge):

    L = CE(z_S, y) + α · t² · (1/K) Σ_k KL( softmax(z_k / t) ‖ softmax(z_S / t) )

KL(p ‖ q) = Σ_c p_c (log p_c − log q_c), averaged over the batch; t is the temperature, and the t²
factor keeps the soft term's gradient scale independent of t (Hinton et al., §2). The paper
writes L = CE + t²·KL(core ‖ teacher/t); we use the standard direction above, the teacher's
softened distribution being the target. α = 1 is the paper's loss.

Prediction consensus (the paper's IoU score): with C_T and C_S the test examples the teacher and
the student classify correctly, IoU = |C_T ∩ C_S| / |C_T ∪ C_S|.

:func:`distill_lm_step` is the same loss for next-token distributions of a causal LM: CE and the
per-token KL over the vocabulary are averaged over the response tokens only.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fedllm.types import StateDict, clone_state

IGNORE_INDEX = -100  # Hugging Face's label value for tokens that carry no loss (prompt, padding)


def _check_temperature(t: float, alpha: float) -> None:
    if not t > 0:
        raise ValueError(f"temperature t must be > 0, got {t}")
    if alpha < 0:
        raise ValueError(f"alpha (weight of the distillation term) must be >= 0, got {alpha}")


def soft_kl(student_logits: Tensor, teacher_logits: Tensor, t: float) -> Tensor:
    """Per-row KL(softmax(teacher/t) ‖ softmax(student/t)) over the last dim; shape = logits[..., 0].

    The teacher side is detached: the core learns from the teacher, never the other way.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"teacher logits shape {tuple(teacher_logits.shape)} differs from the "
                         f"student's {tuple(student_logits.shape)}; expected the same shape")
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    p_t = log_t.exp()  # classes the teacher rules out (logit −inf) add 0, not 0·∞ = NaN
    return torch.where(p_t > 0, p_t * (log_t - log_s), torch.zeros_like(p_t)).sum(-1)


def kd_loss(student_logits: Tensor, teacher_logits_list: Sequence[Tensor], targets: Tensor,
            t: float, alpha: float = 1.0) -> Tensor:
    """L = CE(z_S, y) + α·t²·mean_k KL(softmax(z_k/t) ‖ softmax(z_S/t)) (see the module docstring).

    ``student_logits`` and every teacher's logits are [B, C]; ``targets`` is [B] class indices.
    With no teachers the loss is plain cross-entropy.
    """
    _check_temperature(t, alpha)
    if student_logits.dim() != 2 or targets.shape != student_logits.shape[:1]:
        raise ValueError(f"expected student logits [B, C] and targets [B], got "
                         f"{tuple(student_logits.shape)} and {tuple(targets.shape)}")
    ce = F.cross_entropy(student_logits, targets)
    if not teacher_logits_list:
        return ce
    kl = torch.stack([soft_kl(student_logits, z, t).mean() for z in teacher_logits_list]).mean()
    return ce + alpha * t * t * kl


def distill_lm_step(student: Tensor, teachers_logits: Sequence[Tensor], batch: Mapping[str, Tensor],
                    t: float, alpha: float = 1.0) -> Tensor:
    """Cloned-distillation loss for a causal LM, on the response tokens only.

    ``student`` and each of ``teachers_logits`` are logits [B, T, V] over the vocabulary;
    ``batch["labels"]`` is [B, T] token ids aligned with the inputs, IGNORE_INDEX (−100) on the
    prompt and padding (the Hugging Face convention). Position i predicts token i+1, so logits
    [:, :-1] are scored against labels [:, 1:]. With R the response positions (label ≠ −100):

        L = (1/|R|) Σ_{r∈R} [ CE(z_S,r, y_r) + α·t²·(1/K) Σ_k KL(softmax(z_k,r/t) ‖ softmax(z_S,r/t)) ]
    """
    _check_temperature(t, alpha)
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if labels is None:
        raise ValueError("batch must hold 'labels' [B, T] (IGNORE_INDEX=-100 on non-response tokens)")
    if student.dim() != 3 or labels.shape != student.shape[:2]:
        raise ValueError(f"expected student logits [B, T, V] and labels [B, T], got "
                         f"{tuple(student.shape)} and {tuple(labels.shape)}")
    logits, target = student[:, :-1], labels[:, 1:]
    mask = target != IGNORE_INDEX
    if not bool(mask.any()):
        raise ValueError("batch has no response tokens (every shifted label is -100)")
    ce = F.cross_entropy(logits[mask], target[mask])
    if not teachers_logits:
        return ce
    kl = torch.stack([soft_kl(logits[mask], z[:, :-1][mask], t).mean() for z in teachers_logits]).mean()
    return ce + alpha * t * t * kl


class TeacherMemory:
    """The paper's temporal memory: the last ``capacity`` returned teacher state dicts, FIFO.

    Distilling from every remembered teacher, not only the newest, keeps the knowledge of earlier
    edges in the loss and so counters forgetting. States are deep-copied on the way in.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"memory capacity M must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: deque[StateDict] = deque(maxlen=capacity)

    def push(self, state: Mapping[str, Tensor]) -> None:
        """Remember ``state``; the oldest teacher is dropped when the memory is full."""
        self._items.append(clone_state(state))

    def teachers(self) -> list[StateDict]:
        """The remembered states, oldest first."""
        return list(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def state_dict(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "teachers": [clone_state(s) for s in self._items]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        teachers = list(state["teachers"])
        if len(teachers) > int(state["capacity"]):
            raise ValueError(f"{len(teachers)} teachers exceed the stored capacity {state['capacity']}")
        self.capacity = int(state["capacity"])
        self._items = deque((clone_state(s) for s in teachers), maxlen=self.capacity)


def consensus_iou(teacher_pred: Tensor, student_pred: Tensor, targets: Tensor) -> float:
    """|C_T ∩ C_S| / |C_T ∪ C_S| over the examples each model gets right (0.0 when neither does)."""
    if not teacher_pred.shape == student_pred.shape == targets.shape:
        raise ValueError(f"predictions and targets must have one shape; got {tuple(teacher_pred.shape)}, "
                         f"{tuple(student_pred.shape)}, {tuple(targets.shape)}")
    right_t, right_s = teacher_pred == targets, student_pred == targets
    union = int((right_t | right_s).sum())
    return int((right_t & right_s).sum()) / union if union else 0.0


def shuffle_labels(y: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """A noisy edge's labels: each example is picked with probability p, then the picked labels
    are permuted among themselves (the label histogram is kept; a picked label may land unchanged).

    With C balanced classes about p·(1 − 1/C) of the labels end up wrong. ``y`` is not modified.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label-noise probability p must be in [0, 1], got {p}")
    picked = torch.nonzero(torch.rand(y.shape[0], generator=generator) < p).flatten()
    out = y.clone()
    out[picked] = y[picked[torch.randperm(picked.numel(), generator=generator)]]
    return out
