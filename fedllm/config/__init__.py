"""Recipes: typed, frozen, validated configuration groups loaded from YAML.

A recipe is a YAML file whose top-level keys are the groups. Each group is a frozen dataclass;
every field carries a one-line doc (its ``metadata["doc"]``) and range checks live in
``__post_init__``. Loading walks the dataclasses generically, so a new field needs no parser code.
Every problem raises :class:`RecipeError` naming the dotted field (or file) and what was expected;
the CLI prints it as one line and exits with code 2.

Read in this order:

- :mod:`.groups`: every knob, its meaning and default (declarative: one line per field), and
  :class:`Recipe`, which holds the groups;
- :mod:`.rules`: the rules between groups (combinations that cannot work), run when a
  :class:`Recipe` is built; ``tests/test_compatibility.py`` walks their matrix;
- :mod:`.loading`: YAML and ``key=value`` overrides in, a validated :class:`Recipe` out, and back;
- :mod:`.fields`: what the groups are made of (:func:`doc`, :func:`require`, :class:`RecipeError`).

Import from here (``from fedllm.config import load_recipe, Recipe``); the rooms are an arrangement
for reading, not an API.
"""

from fedllm.config.fields import RecipeError, doc, one_line, require
from fedllm.config.groups import (
    VISION_PRESETS,
    AttackConfig,
    AuditConfig,
    CheckpointConfig,
    CompressionConfig,
    DataConfig,
    EvalConfig,
    FaultsConfig,
    FederationConfig,
    HierarchyConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    PartitionConfig,
    PrivacyConfig,
    PruneConfig,
    Recipe,
    RobustConfig,
    SelectionConfig,
    ServerConfig,
    TrainConfig,
)
from fedllm.config.loading import (
    _type_name,
    apply_overrides,
    build,
    dump_recipe,
    explain,
    load_recipe,
    parse_override,
    read_yaml,
)
from fedllm.config.rules import (
    COMPATIBILITY,
    ddp_problem,
    flower_problem,
    fused_problem,
    he_problem,
    krum_min_updates,
)

__all__ = [
    "COMPATIBILITY", "VISION_PRESETS", "AttackConfig", "AuditConfig", "CheckpointConfig", "CompressionConfig",
    "DataConfig", "EvalConfig", "FaultsConfig", "FederationConfig", "HierarchyConfig", "LoraConfig", "ModelConfig",
    "OutputConfig", "PartitionConfig", "PrivacyConfig", "PruneConfig", "Recipe", "RecipeError", "RobustConfig",
    "SelectionConfig", "ServerConfig", "TrainConfig", "_type_name", "apply_overrides", "build", "ddp_problem", "doc",
    "dump_recipe", "explain", "flower_problem", "fused_problem", "he_problem", "krum_min_updates", "load_recipe",
    "one_line", "parse_override", "read_yaml", "require",
]
