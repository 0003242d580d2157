"""The plot defects a first user met (issue 35), each drawn and read back: integer round ticks on a
1-round run, a BLEU axis scaled to its values, a client band that does not flatten the loss
curves, and a study title that promises only the dashed seeds it draws."""

from __future__ import annotations

import pytest

from fedllm.metrics.report import figure, panels


def _run(mode: str, losses: list[float], bleu: list[float] | None = None,
         band: list[tuple[float, float]] | None = None) -> list[dict]:
    rows = []
    for r, loss in enumerate(losses):
        row = {"round": r, "mode": mode, "train_loss": None if r == 0 else loss + 0.1, "eval_loss": loss,
               "perplexity": 2.718 ** loss, "bleu": None if bleu is None else bleu[r], "accuracy": None,
               "round_time_s": 0.0 if r == 0 else 1.5, "bytes_up": 0, "bytes_down": 0}
        if band is not None:
            lo, hi = band[r]
            row["per_client"] = {"0": {"eval_loss": lo, "perplexity": 2.718 ** lo},
                                 "1": {"eval_loss": hi, "perplexity": 2.718 ** hi}}
        rows.append(row)
    return rows


@pytest.fixture
def drawn():
    """Draw a figure and hand back {panel key: axes}; closed afterwards."""
    figs = []

    def draw(series):
        fig = figure(series, "t")
        figs.append(fig)
        axes = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
        return dict(zip([p.key for p in panels(series)], axes))

    yield draw
    for fig in figs:
        fig.clf()


def _ticks_in_view(ax) -> list[float]:
    lo, hi = ax.get_xlim()
    return [float(t) for t in ax.get_xticks() if lo <= t <= hi]


def test_a_one_round_run_ticks_whole_rounds_on_every_panel(drawn):
    axes = drawn({"federated": _run("federated", [2.3, 2.1], bleu=[0.0, 0.0])})
    for key, ax in axes.items():
        ticks = _ticks_in_view(ax)
        assert ticks and all(t.is_integer() for t in ticks), (key, ticks)  # was 0.945 ... 1.050
        assert 1.0 in ticks, (key, ticks)
        assert ax.get_xlim() == axes["eval_loss"].get_xlim()  # every panel spans the same rounds


def test_the_bleu_axis_fits_its_values_and_says_when_all_are_zero(drawn):
    small = drawn({"federated": _run("federated", [2.3, 2.2, 2.1], bleu=[0.0, 0.3, 0.5])})["bleu"]
    assert small.get_ylim()[1] == pytest.approx(0.54) and small.get_ylim()[0] <= 0  # not a fixed 0-1
    large = drawn({"federated": _run("federated", [2.3, 2.2, 2.1], bleu=[0.0, 8.0, 12.0])})["bleu"]
    assert 12.0 < large.get_ylim()[1] < 14.0
    zero = drawn({"federated": _run("federated", [2.3, 2.2, 2.1], bleu=[0.0, 0.0, 0.0])})["bleu"]
    assert list(zero.get_yticks()) == [0] and any("BLEU 0" in t.get_text() for t in zero.texts)


def test_a_wide_client_band_does_not_flatten_the_loss_curves(drawn):
    """The Fashion-MNIST shards case: local clients' own models reach 11 nats on the shared split,
    while the federated and centralized curves sit between 0.8 and 2.3."""
    fed, cen = _run("federated", [2.3, 2.2, 2.0, 1.7]), _run("centralized", [2.3, 1.3, 0.9, 0.8])
    local = [2.3, 4.2, 5.7, 7.0]
    ax = drawn({"federated": fed, "centralized": cen,
                "local": _run("local", local, band=[(2.3, 2.3), (3.8, 5.5), (4.7, 9.0), (5.3, 11.1)])})["eval_loss"]
    assert ax.get_yscale() == "log"  # the curves span 0.8 .. 7: compared as ratios
    assert ax.get_ylim()[1] > 11.1 and not ax.texts  # on a log axis the band fits without crowding them
    # a band far beyond the curves is clipped at the edge, and the edge says so
    ax = drawn({"federated": fed, "centralized": cen,
                "local": _run("local", local, band=[(2.3, 2.3), (3.8, 15.0), (4.7, 40.0), (5.3, 60.0)])})["eval_loss"]
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "log" and lo < 0.8 and 7.0 < hi < 20.0
    assert any("clipped" in t.get_text() and "60" in t.get_text() for t in ax.texts)
    # curves within a few times of each other keep a linear axis; a band a little wider is drawn whole
    narrow = drawn({"federated": _run("federated", [2.3, 2.2, 2.0]),
                    "local": _run("local", [2.3, 2.4, 2.5], band=[(2.3, 2.3), (2.2, 2.6), (2.3, 2.7)])})
    ax = narrow["eval_loss"]
    assert ax.get_yscale() == "linear" and 1.9 < ax.get_ylim()[0] and 2.7 < ax.get_ylim()[1] < 3.0
    assert not ax.texts


def test_the_study_title_promises_only_the_dashed_seeds_it_draws(tmp_path):
    from fedllm.studies.gradualdiff import plot, seed_note

    run = {"rows": [{"round": 0, "eval_loss": 4.8, "train_loss": None}, {"round": 1, "eval_loss": 4.0, "train_loss": 4.2}]}
    one_seed = {"0": {"federated": run, "centralized": run, "local": run}}
    assert seed_note(one_seed) == "seed 0" and "dashed" not in seed_note(one_seed)
    two = {"0": {"federated": run, "centralized": run, "local": run}, "1": {"federated": run, "centralized": run}}
    assert seed_note(two) == "seed 0 solid; dashed: seed 1 (federated, centralized)"
    assert plot({"natural": one_seed, "iid": two}, tmp_path) == ["loss_natural.png", "loss_iid.png"]
