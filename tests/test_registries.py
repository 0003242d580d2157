"""Each registry is the one source of the names a recipe accepts: the recipe's ``Literal`` names
(what `fedllm validate --explain` shows and the loader checks) equal the registry's keys."""

from typing import get_args, get_type_hints

import pytest

from fedllm.algorithms.aggregate import aggregators
from fedllm.algorithms.compress import CODECS
from fedllm.algorithms.selection import SAMPLERS
from fedllm.algorithms.server_opt import SERVER_UPDATES
from fedllm.config import CompressionConfig, RobustConfig, SelectionConfig, ServerConfig, krum_min_updates


def names(group, field: str) -> set[str]:
    return set(get_args(get_type_hints(group)[field]))


@pytest.mark.parametrize(("group", "field", "registry"), [
    (RobustConfig, "aggregator", set(aggregators()) - {"fednova"}),  # FedNova is chosen by federation.algorithm
    (ServerConfig, "optimizer", set(SERVER_UPDATES)),
    (SelectionConfig, "method", set(SAMPLERS)),
    (CompressionConfig, "codec", set(CODECS)),
])
def test_recipe_names_equal_the_registry(group, field, registry):
    assert names(group, field) == registry


def test_every_registered_aggregator_builds_from_a_recipe_and_states_what_it_needs():
    from fedllm.federation import build
    from tests._toy import toy_recipe

    for name in names(RobustConfig, "aggregator"):
        recipe = toy_recipe(robust={"aggregator": name, "byzantine": 0, "trim_ratio": 0.25}, partition={"num_clients": 4})
        assert callable(build.aggregator(recipe))
        assert build.aggregator_needs(recipe) >= 1
    assert krum_min_updates(2) == 7 and krum_min_updates(1, multi=9) == 9


def test_exact_is_an_old_name_of_svd_and_warns(caplog):
    from tests._toy import toy_recipe

    with caplog.at_level("WARNING", logger="fedllm.config"):
        recipe = toy_recipe(federation={"lora_aggregation": "exact"})
    assert recipe.federation.lora_aggregation == "svd"
    assert any("'exact' is now called 'svd'" in r.getMessage() for r in caplog.records)
