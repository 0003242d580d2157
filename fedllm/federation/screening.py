"""What the server checks before an update or a new global state may count (pure functions).

Applied by :class:`~fedllm.federation.server.FederatedServer` on arrival and at the end of a round,
and by the gossip and clustered topologies the same way: an update's structure, finiteness and
norm (absolute, relative to the round's median, or to earlier rounds' norms when a round has too
few updates for a median of its own), the counts a client reports to weigh it, and whether the
new global state may replace the old one.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedllm.types import ClientUpdate, StateDict, global_norm, subtract


def norm_violation(update: ClientUpdate, max_norm: float | None, norm: float | None = None) -> str | None:
    """Why ``update`` exceeds the norm bound ``max_norm`` (``federation.reject_norm``), or None
    (``norm``: its L2 norm, when already measured)."""
    if max_norm is not None and (norm := global_norm(update.delta) if norm is None else norm) > max_norm:
        return f"L2 norm {norm:.4g} exceeds federation.reject_norm={max_norm}"
    return None


def relative_norm_violations(updates: Sequence[ClientUpdate], factor: float | None,
                             norms: Mapping[int, float] | None = None) -> dict[int, str]:
    """client -> why its norm exceeds ``factor`` x the round's median norm (``federation.reject_norm_factor``).

    A bound from the round's own updates: a client cannot poison the mean with one huge but finite
    update (3e38 moved the shared model to 1e38 before) whatever the absolute scale of honest updates.
    Needs three updates for the median to mean anything; fewer are left to the other checks.
    ``norms``: each client's norm measured on arrival (a streamed round keeps no deltas).
    """
    if factor is None or len(updates) < 3:
        return {}
    norms = {u.client_id: norms[u.client_id] if norms is not None else global_norm(u.delta) for u in updates}
    median = statistics.median(norms.values())
    if median <= 0:  # most updates are exactly zero: no scale to be a multiple of (the guard's business)
        return {}
    return {k: f"L2 norm {n:.4g} exceeds federation.reject_norm_factor={factor:g} x the round's median {median:.4g}"
            for k, n in norms.items() if n > factor * median}


NORM_HISTORY = 32  # accepted norms kept for rounds with too few updates for their own median


def few_norm_violations(norms: Mapping[int, float], factor: float | None, history: Sequence[float],
                        state_norm: float, max_change_ratio: float | None) -> dict[int, str]:
    """client -> why its norm is an outlier in a round of 1 or 2 updates (no median of its own).

    The reference is the median of the norms accepted in earlier applied rounds (``history``, the
    last :data:`NORM_HISTORY`), times ``federation.reject_norm_factor``; before any round was
    applied, the absolute bound is K x ``federation.max_change_ratio`` x the global state's norm
    for K updates: an update that, at an equal share of the mean, would alone move the model by
    more than the round's change bound allows (unless the updates cancel, a round that bound
    rejected whole before). So with two sites, one that sends 3e38 every round is left out and the
    other's update is applied, instead of the whole round being rejected by the change bound every
    round. No bound (no history, a zero state norm or the rules switched off): the round's other
    checks decide.
    """
    if factor is None or not norms or len(norms) >= 3:
        return {}
    reference = statistics.median(history) if history else 0.0
    if reference > 0:
        bound, why = factor * reference, (f"federation.reject_norm_factor={factor:g} x the median {reference:.4g} "
                                          "of the norms accepted in earlier rounds")
    elif max_change_ratio is not None and state_norm > 0:
        bound = len(norms) * max_change_ratio * state_norm
        why = (f"{len(norms)} x federation.max_change_ratio={max_change_ratio:g} x the global state's norm "
               f"{state_norm:.4g} ({len(norms)} update{'s' if len(norms) > 1 else ''}, no round applied yet)")
    else:
        return {}
    return {k: f"L2 norm {n:.4g} exceeds {why}" for k, n in norms.items() if not n <= bound}


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def check_counts(update: ClientUpdate, expected_examples: int | None, max_examples: int = 10_000_000) -> str | None:
    """Why the counts a client reports cannot be used to weigh its update, or None.

    Counts are integers (never a bool, a float or a string) in range: steps 1 .. 10^7, examples
    1 .. ``max_examples`` (``federation.max_client_examples``), and the examples the server knows;
    a reported DP-SGD ε is a number >= 0 (inf is a valid ε: it only makes the run's claim worse).
    """
    for name, value in (("local_steps", update.local_steps), ("num_examples", update.num_examples)):
        if type(value) is not int:
            return f"reported {name}={value!r:.40}; expected an integer"
    if update.local_steps < 1 or update.local_steps > 10_000_000:
        return f"reported local_steps={update.local_steps}; expected 1 .. 10000000"
    if update.num_examples < 1 or (expected_examples is None and update.num_examples > max_examples):
        return f"reported num_examples={update.num_examples}; expected 1 .. {max_examples}"
    eps = update.metrics.get("dpsgd_epsilon", 0.0)  # DP-SGD's per-example ε, of which the server keeps the max
    if isinstance(eps, (bool, str, bytes)) or not _number(eps) >= 0:
        return f"reported dpsgd_epsilon={eps!r:.40}; expected a number >= 0"
    if expected_examples is not None and update.num_examples != expected_examples:
        return (f"reported num_examples={update.num_examples}, but the server knows {expected_examples} "
                "for this client")
    return None


def validate_update(update: ClientUpdate, reference: Mapping[str, torch.Tensor],
                    max_norm: float | None = None) -> str | None:
    """Why ``update`` must not be aggregated (keys, shapes, dtypes, finiteness, norm), or None."""
    if update.delta.keys() != reference.keys():
        missing = sorted(set(reference) - set(update.delta))[:2]
        extra = sorted(set(update.delta) - set(reference))[:2]
        return f"keys differ from the global state (missing {missing}, unexpected {extra})"
    for k, ref in reference.items():
        v = update.delta[k]
        if v.shape != ref.shape:
            return f"{k}: shape {tuple(v.shape)}, expected {tuple(ref.shape)}"
        if v.dtype != ref.dtype:
            return f"{k}: dtype {v.dtype}, expected {ref.dtype}"
    if not update.is_finite():
        return "non-finite values (NaN/Inf)"
    return norm_violation(update, max_norm)


def global_change_problem(old: StateDict, new: StateDict, max_ratio: float | None) -> str | None:
    """Why ``new`` must not replace ``old`` (non-finite, or a change over ``max_ratio`` x ``|old|``)."""
    bad = [k for k, v in new.items() if not bool(torch.isfinite(v).all())]
    if bad:
        return f"non-finite global state ({bad[0]})"
    if max_ratio is None:
        return None
    size, change = global_norm(old), global_norm(subtract(new, old))
    if size > 0 and change > max_ratio * size:
        return (f"the global state would change by {change:.3g}, over federation.max_change_ratio "
                f"({max_ratio:g}) x its norm {size:.3g}")
    return None
