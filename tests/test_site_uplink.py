"""On the Flower engine a site noises and encodes its own update; the coordinator never sees it raw.

- client-level DP noise is drawn from the site's own randomness: the coordinator, which knows the
  recipe's seed, cannot reproduce it, and its size is the mechanism's σC/√K;
- a codec's payload is what the site sends, and its error-feedback residual is kept on the site's
  disk per run and round, so a restarted site re-running a round (a resumed run) sends the same
  payload it sent the first time;
- combinations the sites cannot run are refused with one line (``fedllm.config.flower_problem``).
(The round-by-round parity with the in-process engine, codecs included, is in test_flower.py.)
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from fedllm.config import RecipeError, build, flower_problem  # noqa: E402
from fedllm.federation.flower.site import KEEP_ROUNDS, SiteUplink, needs_site_uplink  # noqa: E402
from fedllm.types import ClientUpdate, serialized_bytes  # noqa: E402
from tests._toy import BASE, ToyExperiment, toy_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _update(k: int, n: int = 20_000, seed: int = 0) -> ClientUpdate:
    gen = torch.Generator().manual_seed(seed)
    return ClientUpdate(client_id=k, delta={"w": 0.01 * torch.randn(n, generator=gen, dtype=torch.float64)},
                        num_examples=10, local_steps=2, train_loss=1.0, bytes_up=0)


def _site(recipe, tmp_path, k=0) -> SiteUplink:
    exp = ToyExperiment(recipe)
    exp.payload_bytes = serialized_bytes
    return SiteUplink(recipe, exp, k, tmp_path, "run")


def test_a_sites_dp_noise_is_its_own_and_of_the_mechanisms_size(tmp_path):
    recipe = toy_recipe(privacy={"dp": "client", "clip": 0.5, "noise_multiplier": 1.0},
                        partition={"method": "iid", "num_clients": 4}, federation={"fraction": 1.0, "weighted": False})
    assert needs_site_uplink(recipe) and flower_problem(recipe) is None
    site = _site(recipe, tmp_path)
    upd = _update(0)
    norm = float(upd.delta["w"].norm())
    clipped = upd.delta["w"] * min(1.0, 0.5 / norm)
    first, enc = site.apply(1, upd)
    again, _ = site.apply(1, upd)
    assert enc is None and first.bytes_up == serialized_bytes(first.delta)
    noise = first.delta["w"] - clipped
    expected = 1.0 * 0.5 / math.sqrt(4)  # σ C / √K
    assert abs(float(noise.std()) / expected - 1) < 0.03
    assert not torch.equal(first.delta["w"], again.delta["w"])  # fresh randomness every upload
    seeded = site.uplink.noise(1, 0, upd.delta)  # what a coordinator knowing the seed could compute
    assert float((first.delta["w"] - seeded["w"]).std()) > 0.5 * expected


def test_a_restarted_site_resends_the_same_payload_for_a_rerun_round(tmp_path):
    recipe = toy_recipe(compression={"codec": "topk", "topk_fraction": 0.1, "error_feedback": True},
                        partition={"method": "iid", "num_clients": 2})
    first = _site(recipe, tmp_path)
    sent = {r: first.apply(r, _update(0, n=500, seed=r))[1].payload for r in (1, 2, 3)}
    assert sent[2] != sent[3]

    restarted = _site(recipe, tmp_path)  # a new process: only the files remain
    assert restarted.apply(3, _update(0, n=500, seed=3))[1].payload == sent[3]
    assert restarted.apply(2, _update(0, n=500, seed=2))[1].payload == sent[2]  # resumed from round 1
    assert restarted.apply(3, _update(0, n=500, seed=3))[1].payload == sent[3]

    fresh = _site(toy_recipe(compression={"codec": "topk", "topk_fraction": 0.1, "error_feedback": True},
                             partition={"method": "iid", "num_clients": 2}), tmp_path / "other")
    assert fresh.apply(3, _update(0, n=500, seed=3))[1].payload != sent[3]  # no residual: a different payload


def test_a_torn_or_too_old_site_state_is_named_not_guessed(tmp_path):
    recipe = toy_recipe(compression={"codec": "sign", "error_feedback": True},
                        partition={"method": "iid", "num_clients": 2})
    site = _site(recipe, tmp_path)
    for r in range(1, KEEP_ROUNDS + 3):
        site.apply(r, _update(0, n=50, seed=r))
    with pytest.raises(RuntimeError, match=r"keeps uplink states from round 3 .* round 2 needs an older one"):
        site.apply(2, _update(0, n=50))
    site.path.write_bytes(site.path.read_bytes()[:40])
    with pytest.raises(RuntimeError, match=rf"{site.path.name}: unreadable uplink state"):
        site.apply(KEEP_ROUNDS + 3, _update(0, n=50))


@pytest.mark.parametrize(("groups", "field"), [
    ({"attack": {"kind": "sign_flip", "fraction": 0.5}}, "attack.kind"),
    ({"federation": {"algorithm": "scaffold"}, "compression": {"codec": "q8"}}, "federation.algorithm"),
    ({"federation": {"algorithm": "scaffold", "weighted": False},
      "privacy": {"dp": "client", "clip": 1.0, "noise_multiplier": 0.5}},
     "federation.algorithm"),
    ({"privacy": {"secure_aggregation": True}, "federation": {"weighted": False}}, "privacy.secure_aggregation"),
])
def test_what_the_sites_cannot_run_is_refused_with_its_field(groups, field):
    recipe = toy_recipe(**groups)
    problem = flower_problem(recipe)
    assert problem is not None and problem[0] == field and "Flower engine cannot run this" in problem[1]
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for name, group in {**groups, "federation": {**groups.get("federation", {}), "engine": "flower"}}.items():
        values[name] = {**values.get(name, {}), **group}
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        build(type(recipe), values)


def test_the_deployment_app_writer_refuses_them_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fedllm.federation.flower", "app", str(ROOT / "recipes" / "tiny.yaml"),
                           "attack.kind=sign_flip", "attack.fraction=0.5", "--app-dir", str(tmp_path / "app"),
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)})
    assert done.returncode == 2, done.stderr[-1500:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedllm: error: attack.kind:"), lines
    assert not (tmp_path / "app").exists()
