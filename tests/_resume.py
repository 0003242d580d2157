"""One run cut off partway and resumed, beside the same run uninterrupted (the resume tests' shape).

A hook that raises :class:`Cut` stands in for a kill at a known point: the run directory then holds
exactly what the process had written (rows, checkpoints), and ``resume=True`` must carry on to the
uninterrupted run's result.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedllm.federation.modes import Hooks, run_federated


class Cut(Exception):
    """Raised by a hook to stop a run where a kill would."""


def stop(when: bool) -> None:
    if when:
        raise Cut


def at_round(r: int) -> Hooks:
    """Hooks that cut a run off as round ``r`` starts (rounds before it are done and checkpointed)."""
    return Hooks(on_round=lambda rnd, total: stop(rnd == r))


def whole_and_resumed(make: Callable[[], Any], tmp_path: Path, hooks: Hooks,
                      runner: Callable[..., Any] = run_federated) -> tuple[Any, Any]:
    """(uninterrupted experiment, resumed experiment): ``make()``'s run under ``tmp_path/whole``, and
    under ``tmp_path/cut`` once cut off by ``hooks`` and then resumed by a fresh ``make()``."""
    whole = make()
    runner(whole, out=str(tmp_path / "whole"))
    with pytest.raises(Cut):
        runner(make(), out=str(tmp_path / "cut"), hooks=hooks)
    resumed = make()
    runner(resumed, out=str(tmp_path / "cut"), resume=True)
    return whole, resumed


def untimed(rows: list[dict]) -> list[dict]:
    """Metrics rows without their wall-clock fields (the only ones a resume may change)."""
    return [{k: v for k, v in r.items() if not k.endswith("_time_s")} for r in rows]
