"""Studies whose measured tables go into the README and docs/ (each: python -m fedllm.studies.<name>)."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_process() -> None:
    """A study's entry point: offline, no tokenizer threads, no warnings or Lightning chatter
    (process-wide settings belong to the entry point, ARCHITECTURE.md decision 9)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "fedllm"):
        logging.getLogger(name).setLevel(logging.ERROR)
