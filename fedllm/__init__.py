"""fedllm: federated fine-tuning of language models (4-bit + LoRA) and vision baselines.

Importing the package has no side effects and loads nothing heavy; process-wide settings live in
:mod:`fedllm.cli`. The Python API (:mod:`fedllm.api`) is reached lazily::

    import fedllm
    result = fedllm.run("recipes/tiny.yaml", "federation.rounds=1", out="runs/notebook")
"""

import importlib

__version__ = "0.1.0"

_API = ("run", "compare", "load_run", "load_comparison", "RunResult", "Comparison")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """``fedllm.run`` and friends: :mod:`fedllm.api` is imported on first use, not with the package."""
    if name in _API:
        return getattr(importlib.import_module("fedllm.api"), name)
    raise AttributeError(f"module 'fedllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
