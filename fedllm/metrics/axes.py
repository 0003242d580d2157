"""Axis choices that keep the run plots readable at a glance (:mod:`fedllm.metrics.report`).

Three defects a first user met (issue 35) and the rule that replaces each:

- **rounds are integers**: a 1-round run once had x ticks 0.945 … 1.050 on a panel whose only
  point was round 1 (matplotlib's ``MaxNLocator(integer=True)`` gives up below two integers in
  view). Every panel now spans the same rounds as the whole figure and ticks only integers.
- **amounts from 0, scaled to their values**: BLEU was drawn on a fixed 0–1 axis (sacreBLEU scores
  run 0–100); it now starts at 0 and ends a little above its largest value, and a panel whose
  values are all 0 shows one tick at 0 and says so in words.
- **a wide client band does not flatten the curves**: local mode's range over clients (each
  client's own model on the shared held-out split: on Fashion-MNIST shards up to 11 nats while the
  federated and centralized curves sit between 0.7 and 2.3) no longer flattens the loss axis. The
  axis fits the drawn lines and turns logarithmic when they span more than ``LOG_SPAN`` times (a
  loss or perplexity is compared as a ratio, and a log axis shows each curve's relative change at
  the same height wherever it sits); a band may widen it by ``BAND_ROOM`` of the lines' span, and
  one reaching further is clipped at the edge, its range named there.
"""

from __future__ import annotations

from collections.abc import Sequence

LOG_SPAN = 4.0  # largest / smallest drawn value beyond which a loss axis is logarithmic
BAND_ROOM = 0.5  # how much (a fraction of the lines' own span) a client band may widen the axis


def round_axis(ax, rounds: Sequence[int]) -> None:
    """Integer ticks over the figure's rounds (the same x range on every panel)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if rounds:
        lo, hi = min(rounds), max(rounds)
        pad = max(0.5, 0.04 * (hi - lo))
        ax.set_xlim(lo - pad, hi + pad)


def amount_axis(ax, top: float, empty_note: str) -> None:
    """From 0 to a little above ``top``; all zero: one tick at 0 and ``empty_note`` in the panel."""
    if top > 0:
        ax.set_ylim(-0.02 * top, top * 1.08)
        return
    ax.set_ylim(-0.05, 1)
    ax.set_yticks([0])
    ax.text(0.5, 0.5, empty_note, transform=ax.transAxes, ha="center", va="center", color="0.4")


def loss_axis(ax, lines: Sequence[float], band: tuple[float, float] | None) -> bool:
    """Fit the y axis to the drawn ``lines``; logarithmic when they span more than :data:`LOG_SPAN`
    times. A client ``band`` (lowest, highest) widens the axis only while that adds at most
    ``BAND_ROOM`` of the lines' own span (in the axis' scale); beyond, it is clipped at the edge and
    its range named there. Returns whether the axis is logarithmic."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not lines:
        return False
    lo, hi = min(lines), max(lines)
    log = lo > 0 and hi / lo > LOG_SPAN
    scale = math.log if log else (lambda v: v)
    if band is not None and (band[0] > 0 or not log):
        wide_lo, wide_hi = min(lo, band[0]), max(hi, band[1])
        if (scale(wide_hi) - scale(wide_lo)) - (scale(hi) - scale(lo)) <= BAND_ROOM * (scale(hi) - scale(lo)):
            lo, hi = wide_lo, wide_hi
    if log:
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.1, hi * 1.1)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        pad = 0.06 * (hi - lo) or 0.05 * abs(hi) or 0.05
        ax.set_ylim(lo - pad, hi + pad)
    bottom, top = ax.get_ylim()
    if band is not None and (band[0] < bottom or band[1] > top):
        ax.text(0.99, 0.98, f"range over clients clipped: {band[0]:.3g} to {band[1]:.3g}",
                transform=ax.transAxes, ha="right", va="top", fontsize=7, color="0.3",
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1.5})
    return log
