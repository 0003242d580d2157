"""``data.template``: base causal LMs without a chat template train and answer through Alpaca's
layout or a user template string, and the same prompt reaches the model in training and serving."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedllm.cli import main
from fedllm.config import RecipeError, load_recipe
from fedllm.data.text import IGNORE, prompt_token_ids, render_prompt, tokenize
from fedllm.models.llm import load_tokenizer, tiny_dir

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "examples" / "base_model_alpaca.yaml"
SHORT = ["federation.rounds=1", "train.local_steps=1", "eval.bleu_samples=2", "data.max_examples=40",
         "data.eval_size=6", "output.plots=false"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """The tiny llama as a *base* checkpoint: its tokenizer stripped of any chat template."""
    out = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(tiny_dir(0), out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(out).chat_template is None
    return out


def test_alpaca_and_template_strings_render_one_turn():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is X?"}]
    assert render_prompt(msgs, "alpaca") == "Be brief.\n\n### Instruction:\nWhat is X?\n\n### Response:\n"
    assert render_prompt(msgs[1:], "alpaca").startswith("Below is an instruction that describes a task.")
    assert render_prompt(msgs, "[{system}] Q: {prompt}\nA:") == "[Be brief.] Q: What is X?\nA:"
    with pytest.raises(RecipeError, match="renders one user turn"):
        render_prompt([*msgs, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z"}], "alpaca")
    for bad in ("no placeholder", "{prompt} {other}", "{prompt"):
        with pytest.raises(RecipeError, match="^data.template"):
            load_recipe(RECIPE, [f"data.template={bad}"])


def test_an_example_is_prompt_response_and_eos_with_the_loss_on_the_answer(base_dir):
    tok = load_tokenizer(base_dir)
    cfg = load_recipe(RECIPE).data
    ex = tokenize({"prompt": "What is X?", "response": "X is a letter."}, 0, tok, cfg, "row 1")
    assert ex.input_ids[-1] == tok.eos_token_id
    prompt = prompt_token_ids(tok, [{"role": "system", "content": cfg.system_prompt},
                                    {"role": "user", "content": "What is X?"}], "alpaca")
    assert ex.prompt_ids == prompt == ex.input_ids[:len(prompt)]
    assert tok.decode(prompt).rstrip().endswith("### Response:")
    assert ex.labels[:len(prompt)] == [IGNORE] * len(prompt) and ex.labels[len(prompt):] == ex.input_ids[len(prompt):]


def test_a_base_model_without_chat_template_trains_and_serves(base_dir, tmp_path, capsys):
    with pytest.raises(RecipeError, match="^data.template: the model's tokenizer has no chat template"):
        from fedllm.experiments import make_experiment

        make_experiment(load_recipe(RECIPE, [f"model.path={base_dir}", "data.template=chat", *SHORT]))
    assert main(["run", str(RECIPE), f"model.path={base_dir}", *SHORT, "--out", str(tmp_path)]) == 0
    run = tmp_path / "base_model_alpaca" / "federated"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "What is a pathway?", "--max-new-tokens", "4"]) == 0
    answer = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert answer["prompt"] == "What is a pathway?" and isinstance(answer["response"], str)
