"""Model replacement (Bagdasaryan et al., 2020): the trigger, the poisoned data, the boost γ = n/η by
hand against the mean, and the engine's backdoor_success metric on real Fashion-MNIST; diversity
sampling through the engine (it reads the vision partition's label histograms)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedllm.algorithms.aggregate import MeanAggregator
from fedllm.algorithms.attacks import Attack, attack_update
from fedllm.algorithms.backdoor import PATCH, backdoor_success, poison, stamp
from fedllm.config import RecipeError
from fedllm.types import ClientUpdate


def test_stamp_writes_a_checkerboard_in_the_bottom_right_corner_only():
    x = torch.full((2, 1, 28, 28), 0.3)
    s = stamp(x)
    patch = s[0, 0, -PATCH - 1:-1, -PATCH - 1:-1]
    assert patch[0, 0] == 1 and patch[0, 1] == 0 and patch[1, 1] == 1 and float(patch.sum()) == PATCH * PATCH / 2
    s[..., -PATCH - 1:-1, -PATCH - 1:-1] = 0.3
    assert torch.equal(s, x) and float(x.max()) == pytest.approx(0.3)  # nothing else changed, input untouched


def test_poison_relabels_a_seeded_fraction_to_the_target():
    x, y = torch.zeros(10, 1, 28, 28), torch.arange(10) % 3 + 1
    px, py = poison(x, y, target=0, fraction=0.5, seed=[0, 1, 2])
    hit = py == 0
    assert int(hit.sum()) == 5 and bool((px[hit].sum(dim=(1, 2, 3)) == PATCH * PATCH / 2).all())
    assert bool((px[~hit] == 0).all()) and torch.equal(py[~hit], y[~hit])
    assert torch.equal(poison(x, y, 0, 0.5, [0, 1, 2])[1], py)  # seeded


class TriggerDetector(torch.nn.Module):
    """Class 0 when the trigger's first pixel is lit, else class 1 (a perfectly backdoored model)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        lit = x[:, 0, -PATCH - 1, -PATCH - 1] > 0.5
        return torch.stack([lit.float(), (~lit).float()], dim=1) + 0 * self.w


def test_backdoor_success_counts_stamped_non_target_images_put_in_the_target():
    x, y = torch.zeros(6, 1, 28, 28), torch.tensor([0, 1, 1, 2, 2, 2])
    assert backdoor_success(TriggerDetector(), x, y, target=0) == 1.0  # the 5 non-target images
    assert backdoor_success(TriggerDetector(), x, y, target=1) == 0.0  # it never says 1 once stamped


def test_boost_n_over_eta_replaces_the_global_model():
    # Bagdasaryan et al. eq. 3: with G' = G + (eta/n) sum_i (L_i - G), the attacker sends
    # gamma (X - G), gamma = n/eta; here eta = 1, n = 4: G' = X + (1/4) sum_honest Delta_i.
    n, target = 4, torch.tensor([2.0, -1.0])
    honest = [ClientUpdate(k, {"w": torch.tensor([0.1 * k, 0.0])}, 1, 1, 0.0) for k in range(3)]
    attacker = ClientUpdate(3, {"w": target}, 1, 1, 0.0)  # X - G with G = 0
    boost = Attack("backdoor", 0.25, scale=float(n), rounds=(5,))
    sent = attack_update(attacker, boost, round=5)
    assert torch.equal(sent.delta["w"], n * target)
    new = MeanAggregator()(honest + [sent])["w"]
    assert torch.allclose(new, target + sum(u.delta["w"] for u in honest) / n)
    assert attack_update(attacker, boost, round=4) is attacker  # honest outside its rounds


def test_default_boost_is_the_number_of_clients_per_round():
    from fedllm.federation import build
    from tests._toy import toy_recipe

    vision = {"model": {"preset": "lenet300100"}, "data": {"builtin": "fashion_mnist"}}
    spec, who = build.attack(toy_recipe(attack={"kind": "backdoor", "fraction": 0.25}, **vision), 4)
    assert spec.scale == 4.0 and len(who) == 1 and spec.rounds is None
    spec, _ = build.attack(toy_recipe(attack={"kind": "backdoor", "boost": 2.5, "backdoor_rounds": [3]}, **vision), 4)
    assert spec.scale == 2.5 and spec.rounds == (3,)
    with pytest.raises(RecipeError, match="attack.kind: backdoor needs class labels"):
        toy_recipe(attack={"kind": "backdoor"})


# ----------------------------------------------------------------------------- the engine, Fashion-MNIST

REAL = Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz").is_file()


@pytest.mark.skipif(not REAL, reason="dataset-fashion-mnist is not installed")
def test_engine_rows_report_backdoor_success_and_diversity_picks_by_labels(tmp_path):
    from fedllm.federation.modes import run_federated
    from fedllm.federation.rundir import read_metrics
    from tests.test_vision_experiment import experiment

    exp = experiment(attack={"kind": "backdoor", "fraction": 0.25, "backdoor_rounds": [2]},
                     federation={"fraction": 1.0, "weighted": False}, data={"open_data": 0})
    assert exp.backdoors and len(exp.backdoors) == 1
    run_federated(exp, out=str(tmp_path))
    rows = read_metrics(tmp_path / "vision_test" / "federated")
    assert all(0.0 <= r["backdoor_success"] <= 1.0 for r in rows)
    div = experiment(selection={"method": "diversity"}, data={"open_data": 0}, federation={"rounds": 1})
    # the attacker poisons only in its round: in round 1 its fit equals an honest client's on the same data
    k = next(iter(exp.backdoors))
    ex, start = exp.data.client_examples(k), exp.initial_state
    assert all(torch.equal(a, b) for a, b in zip(exp.fit(k, ex, start, 1, 2).delta.values(),
                                                  div.fit(k, ex, start, 1, 2).delta.values()))
    poisoned, honest = exp.fit(k, ex, start, 2, 2).delta, div.fit(k, ex, start, 2, 2).delta
    assert any(not torch.equal(poisoned[key], honest[key]) for key in poisoned)

    hist = div.data.label_histograms()
    assert sorted(hist) == [0, 1, 2, 3] and sum(map(sum, hist.values())) == 600
    run_federated(div, out=str(tmp_path / "div"))
    picked = read_metrics(tmp_path / "div" / "vision_test" / "federated")[1]["aggregated_clients"]
    assert len(picked) == 2
