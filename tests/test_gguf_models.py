"""Any local GGUF file as ``model.path``: dequantized once into fedllm's cache, then a model like any other.

A tiny llama is written as a GGUF file in-process (tests/_families.py: the ``gguf`` package's
GGUFWriter, F32 tensors under llama.cpp's names and q/k permutation); fedllm's cache of it must give
the source model's logits exactly, train one federated round and export. A GGUF of an architecture
transformers cannot read, and a file that is not GGUF, are one-line errors naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedllm.cli import main
from fedllm.config import ModelConfig
from tests._families import ALL_LINEAR, family_model, small_tokenizer_dir, tokenizer, write_llama_gguf
from tests.test_families import EXAMPLES, FAST

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh FEDLLM_CACHE (the test tokenizer is found in the real one first)."""
    small_tokenizer_dir()
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_gguf_is_dequantized_once_and_trains(tmp_path, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedllm.models.llm import model_dir, tokenizer_dir

    source = family_model("llama")
    gguf = write_llama_gguf(source, tmp_path / "tiny-llama.F32.gguf")
    cfg = ModelConfig(path=str(gguf))
    tok_dir = tokenizer_dir(cfg, 0)  # what `fedllm validate` reads: the tokenizer alone
    assert tok_dir.parent == cache and not (tok_dir / "model.safetensors").exists()
    text = "How can I sleep better?"
    assert AutoTokenizer.from_pretrained(tok_dir)(text)["input_ids"] == tokenizer()(text)["input_ids"]
    cached = model_dir(cfg, 0)
    assert cached.parent == cache and (cached / "model.safetensors").is_file()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    ids = torch.tensor([tokenizer()(text)["input_ids"]])
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()
        assert torch.equal(loaded(input_ids=ids).logits, source(input_ids=ids).logits)
    assert model_dir(cfg, 0) == cached and (cached / "model.safetensors").stat().st_mtime_ns == stamp  # once

    recipe = str(EXAMPLES / "llama.yaml")
    assert main(["run", recipe, f"model.path={gguf}", *FAST, "--out", str(tmp_path / "runs")]) == 0
    run = tmp_path / "runs" / "llama" / "federated"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["machine"]["lora_target_modules"] == ALL_LINEAR["llama"]
    assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    info = json.loads((tmp_path / "adapter" / "fedllm_export.json").read_text())
    assert adapter["base_model_name_or_path"] == str(cached) and info["gguf"] == str(gguf.resolve())


def test_gguf_architecture_transformers_cannot_read_is_one_line(tmp_path, cache, capsys):
    gguf = write_llama_gguf(family_model("llama"), tmp_path / "odd.gguf", arch="fakearch")
    assert main(["validate", str(ROOT / "recipes" / "tiny.yaml"), f"model.path={gguf}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.path" in err[0] and str(gguf) in err[0] and "'fakearch'" in err[0], err
    assert "llama" in err[0]  # the architectures it can read are listed


@pytest.mark.parametrize("content", [b"not a gguf file at all" * 4, b""], ids=["garbage", "empty"])
def test_a_file_that_is_not_gguf_is_one_line(tmp_path, cache, capsys, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    assert main(["validate", str(ROOT / "recipes" / "tiny.yaml"), f"model.path={bad}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.path" in err[0] and str(bad) in err[0] and "GGUF" in err[0], err


def test_missing_gguf_is_named(tmp_path, capsys):
    missing = tmp_path / "nowhere.gguf"
    assert main(["validate", str(ROOT / "recipes" / "tiny.yaml"), f"model.path={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.path" in err[0] and str(missing) in err[0], err
