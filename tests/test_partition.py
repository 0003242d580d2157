import pytest

from fedllm.config import PartitionConfig, RecipeError
from fedllm.data.partition import holdout, partition


def covers(parts, n):
    flat = sorted(i for p in parts for i in p)
    return flat == list(range(n))


@pytest.mark.parametrize("method,kw", [("iid", {}), ("quantity_skew", {"alpha": 0.5}),
                                       ("dirichlet", {"column": "y", "alpha": 0.3}),
                                       ("natural", {"column": "y"}), ("shards", {"column": "y"})])
def test_partitions_cover_every_example_once_and_are_seeded(method, kw):
    labels = [i % 4 for i in range(200)]
    cfg = PartitionConfig(method=method, num_clients=4, **kw)
    a, b = partition(200, labels, cfg, seed=3), partition(200, labels, cfg, seed=3)
    assert covers(a, 200) and a == b


def test_natural_groups_by_value():
    labels = ["x"] * 5 + ["y"] * 3 + ["z"] * 2
    parts = partition(10, labels, PartitionConfig(method="natural", column="c", num_clients=3), 0)
    assert sorted(len(p) for p in parts) == [2, 3, 5]
    assert all(len({labels[i] for i in p}) == 1 for p in parts)


def test_shards_give_each_client_two_label_runs():
    labels = [i // 50 for i in range(500)]  # 10 labels, sorted
    parts = partition(500, labels, PartitionConfig(method="shards", column="y", num_clients=5), 0)
    assert all(len({labels[i] for i in p}) <= 2 for p in parts)


def test_more_clients_than_examples_names_the_field():
    with pytest.raises(RecipeError, match="partition.num_clients"):
        partition(3, None, PartitionConfig(num_clients=4), 0)


def test_holdout_disjoint_and_deterministic():
    tr, ev = holdout(100, 10, 1)
    assert len(ev) == 10 and not set(tr) & set(ev) and holdout(100, 10, 1) == (tr, ev)
