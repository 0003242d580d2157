"""Every experiment the engine drives provides the whole Experiment protocol, and the engine reads
it directly: no ``getattr`` probing of optional members."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedllm.experiments import Experiment, ExperimentData
from tests._toy import ToyExperiment, toy_recipe

PKG = Path(__file__).resolve().parents[1] / "fedllm"


def test_the_toy_experiment_satisfies_the_protocol():
    exp = ToyExperiment(toy_recipe())
    assert isinstance(exp, Experiment) and isinstance(exp.data, ExperimentData)
    assert (exp.mask, exp.mask_bytes) == (None, 0) and "torch" in exp.runtime_info()


def test_the_lm_experiment_satisfies_the_protocol(tiny_experiment):
    assert isinstance(tiny_experiment, Experiment) and isinstance(tiny_experiment.data, ExperimentData)
    assert (tiny_experiment.mask, tiny_experiment.mask_bytes) == (None, 0)
    info = tiny_experiment.runtime_info()
    assert info["linear4bit_layers"] > 0 and info["4bit_kernel"] == "exact"


def test_the_remote_experiment_forwards_every_member_but_fit():
    pytest.importorskip("flwr")
    from fedllm.federation.flower.coordinator import RemoteExperiment, Site

    local = ToyExperiment(toy_recipe())
    sites = {k: Site(100 + k, 3 + k, False) for k in range(local.recipe.partition.num_clients)}
    remote = RemoteExperiment(local, grid=None, sites=sites, timeout_s=1.0)
    assert isinstance(remote, Experiment) and isinstance(remote.data, ExperimentData)
    assert remote.recipe is local.recipe and remote.initial_state is local.initial_state
    assert remote.step_callbacks is local.step_callbacks and (remote.mask, remote.mask_bytes) == (None, 0)
    assert len(remote.data.client_examples(1)) == 4 and remote.data.stats is local.data.stats
    assert remote.runtime_info().keys() == local.runtime_info().keys()


def test_the_engine_reads_experiments_without_getattr():
    probes = re.compile(r"getattr\(\s*(self\._)?exp\b|def __getattr__")
    engine = [*(PKG / "federation").rglob("*.py"), *(PKG / "studies").glob("*.py")]
    bad = [f"{p.relative_to(PKG.parent)}:{i}" for p in engine
           for i, line in enumerate(p.read_text().splitlines(), 1) if probes.search(line)]
    assert not bad, bad
