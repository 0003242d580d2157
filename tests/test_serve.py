"""``fedllm generate`` and ``fedllm chat`` answer from the run's trained adapter, with the run's chat
template and system prompt, greedily."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from fedllm.cli import main

pytestmark = pytest.mark.slow
PROMPTS = ["What helps with anxiety?", "How can I sleep better?", "What is a panic attack?"]
NEW = 12


def test_the_saved_adapter_is_what_answers(tiny_run_model, tiny_run_dir):
    """Every LoRA factor of the loaded model equals the run's saved one, and training moved B off 0."""
    _, model, _ = tiny_run_model
    saved = load_file(tiny_run_dir / "adapter" / "adapter_model.safetensors")
    params = {k.replace(".default.", "."): v for k, v in model.named_parameters() if "lora_" in k}
    assert params.keys() == saved.keys()
    assert all(torch.equal(params[k].detach().cpu(), saved[k]) for k in saved)
    assert any(float(v.abs().max()) > 0 for k, v in saved.items() if "lora_B" in k)


def test_prompts_use_the_run_chat_template_and_system_prompt(tiny_run_model):
    from fedllm.data.text import prompt_token_ids
    from fedllm.serve import conversation

    recipe, _, tok = tiny_run_model
    text = tok.decode(prompt_token_ids(tok, conversation(recipe, [], "hello?"), recipe.data.template))
    assert recipe.data.system_prompt in text and "hello?" in text
    assert text.rstrip().endswith("assistant")  # generation prompt of SmolLM2's template


def test_generate_file_answers_every_prompt_from_the_adapter(tiny_run_dir, tiny_run_model, tmp_path):
    from fedllm.serve import conversation, respond

    recipe, model, tok = tiny_run_model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPTS[0]}) + "\n\n" + "\n".join(json.dumps(p) for p in PROMPTS[1:]) + "\n")
    out = tmp_path / "answers.jsonl"
    argv = ["generate", str(tiny_run_dir), "--file", str(prompts), "--out", str(out), "--max-new-tokens", str(NEW)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert all(set(r) == {"prompt", "response"} and r["response"] for r in rows)
    # the answers are the adapter's (greedy, so reproducible), not the untrained base's
    for r in rows:
        msgs = conversation(recipe, [], r["prompt"])
        assert respond(model, tok, msgs, NEW) == r["response"]
        with model.disable_adapter():
            assert respond(model, tok, msgs, NEW) != r["response"]
    # same answers a second time (greedy decoding)
    again = tmp_path / "again.jsonl"
    assert main([*argv[:-3], str(again), "--max-new-tokens", str(NEW)]) == 0
    assert again.read_text() == out.read_text()


def test_generate_prompt_flags_write_jsonl_to_stdout(tiny_run_dir, capsys):
    assert main(["generate", str(tiny_run_dir), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:2]


def test_chat_answers_stdin_until_exit(tiny_run_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n\n/reset\n{PROMPTS[1]}\n/exit\nnot read\n"))
    assert main(["chat", str(tiny_run_dir), "--max-new-tokens", "6"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("assistant> ") and lines[1] == "(conversation cleared)"
    assert lines[2].startswith("assistant> ") and len(lines) == 3


def test_chat_keeps_the_conversation_and_stops_at_eof(tiny_run_model):
    from fedllm.serve import chat_loop, conversation, respond

    recipe, model, tok = tiny_run_model
    said: list[str] = []
    assert chat_loop(recipe, model, tok, iter(PROMPTS[:2]), said.append, 6) == 2
    first = said[0].removeprefix("assistant> ")
    history = [{"role": "user", "content": PROMPTS[0]}, {"role": "assistant", "content": first}]
    assert said[1] == "assistant> " + respond(model, tok, conversation(recipe, history, PROMPTS[1]), 6)


def test_generate_bad_input_is_one_line(tiny_run_dir, tmp_path, capsys):
    def one_line(argv, *parts):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("fedllm: error: ") and "Errno" not in err, err
        assert all(p in err for p in parts), err

    one_line(["generate", str(tiny_run_dir), "--file", str(tmp_path / "none.jsonl")], "none.jsonl", "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{"question": 3}\n')
    one_line(["generate", str(tiny_run_dir), "--file", str(bad)], "bad.jsonl:2", "'prompt'")
    bad.write_text('{"prompt": "x"\n')
    one_line(["generate", str(tiny_run_dir), "--file", str(bad)], "bad.jsonl:1", "not valid JSON")
    one_line(["generate", str(tiny_run_dir)], "--prompt", "--file")
    one_line(["generate", str(tiny_run_dir), "--prompt", "x", "--max-new-tokens", "0"], "positive integer")
    one_line(["chat", str(tmp_path)], str(tmp_path), "expected a run directory")
