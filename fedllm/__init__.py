"""fedllm: federated fine-tuning of language models (4-bit + LoRA) and vision baselines.

Importing the package has no side effects; process-wide settings live in :mod:`fedllm.cli`.
"""

__version__ = "0.1.0"
