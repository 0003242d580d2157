"""The cost-to-accuracy metrics of HP-FL (Itahara et al., 2020), computed from metrics rows alone.

For a target test accuracy x:

- NRA@x: the number of rounds until the global model first reaches accuracy >= x;
- CCA@x: the cumulative communication (bytes up + bytes down, all clients) spent up to and
  including that round;
- CTA@x: the cumulative client compute time (``train_time_s``) spent up to that round.

Each is ``None`` when x is never reached (rounds without an evaluation, ``accuracy: null``, cannot
reach it). Round 0 (the initial model, no cost) counts: a model that starts above x has
NRA@x = 0, CCA@x = 0, CTA@x = 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def _key(x: float) -> str:
    return f"{x:g}"


def cost_to_accuracy(rows: Iterable[Mapping[str, Any]], targets: Sequence[float]) -> dict[str, dict[str, Any]]:
    """``{"0.7": {"rounds": NRA, "bytes": CCA, "train_time_s": CTA}, ...}`` for each target x.

    ``rows`` are a run's metrics rows in round order (``round``, ``accuracy``, ``bytes_up``,
    ``bytes_down``, ``train_time_s``; missing costs count as 0). Values are ``None`` for a target
    never reached.
    """
    for x in targets:
        if not 0 < x <= 1:
            raise ValueError(f"targets are accuracies in (0, 1], got {x}")
    out: dict[str, dict[str, Any]] = {_key(x): {"rounds": None, "bytes": None, "train_time_s": None}
                                      for x in targets}
    total_bytes, total_time = 0, 0.0
    pending = sorted(set(targets))
    for row in rows:
        total_bytes += int(row.get("bytes_up") or 0) + int(row.get("bytes_down") or 0)
        total_time += float(row.get("train_time_s") or 0.0)
        acc = row.get("accuracy")
        if acc is None:
            continue
        for x in [x for x in pending if acc >= x]:
            out[_key(x)] = {"rounds": int(row["round"]), "bytes": total_bytes, "train_time_s": total_time}
            pending.remove(x)
        if not pending:
            break
    return out
