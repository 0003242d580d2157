"""Chat templates without a system role (Gemma): ``data.system_prompt`` is folded into the first user
turn, in training and in serving, exactly as Gemma 3's own template places it; a template with a
system role is used unchanged."""

from __future__ import annotations

import pytest

from fedllm.config import DataConfig
from fedllm.data.chat import chat_messages, fold_system, system_role_ok
from fedllm.data.text import IGNORE, prompt_token_ids, tokenize
from tests._families import family_tokenizer

SYSTEM, QUESTION, ANSWER = "Only reply like a pirate.", "What is the answer?", "Arrr, 42."
CONVO = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


def test_gemma2_template_refuses_system_and_fedllm_folds_it():
    tok = family_tokenizer("gemma2")
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(CONVO, tokenize=False)
    assert not system_role_ok(tok)
    ids = prompt_token_ids(tok, CONVO, "chat")
    text = tok.decode(ids)
    assert text == f"{tok.bos_token}<start_of_turn>user\n{SYSTEM}\n\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n"


def test_fold_matches_gemma3_own_placement():
    """Gemma 3's template folds the system message itself: fedllm's fold over Gemma 2's gives the same tokens."""
    gemma2, gemma3 = family_tokenizer("gemma2"), family_tokenizer("gemma3")
    assert system_role_ok(gemma3)  # it shows the system text, so fedllm passes the conversation unchanged
    assert chat_messages(gemma3, CONVO) is CONVO
    assert prompt_token_ids(gemma2, CONVO, "chat") == prompt_token_ids(gemma3, CONVO, "chat")


def test_training_example_on_a_template_without_system_role():
    tok = family_tokenizer("gemma2")
    cfg = DataConfig(builtin="coralmap", system_prompt=SYSTEM, max_length=256)
    ex = tokenize({"prompt": QUESTION, "response": ANSWER}, 0, tok, cfg, "row 1")
    assert ex.prompt_ids == prompt_token_ids(tok, CONVO, "chat")  # as generate/chat will prompt it
    assert ex.input_ids[: len(ex.prompt_ids)] == ex.prompt_ids
    assert all(t == IGNORE for t in ex.labels[: len(ex.prompt_ids)]) and ex.labels[len(ex.prompt_ids)] != IGNORE
    assert ANSWER in tok.decode(ex.input_ids[len(ex.prompt_ids):])
    assert ex.prompt == QUESTION  # the user's question, not the folded text


def test_template_with_a_system_role_is_unchanged():
    tok = family_tokenizer("qwen2")  # ChatML
    assert system_role_ok(tok) and chat_messages(tok, CONVO) is CONVO
    direct = tok.apply_chat_template(CONVO, add_generation_prompt=True, tokenize=True)
    assert prompt_token_ids(tok, CONVO, "chat") == list(getattr(direct, "input_ids", direct))


def test_template_that_drops_the_system_message_is_folded():
    tok = family_tokenizer("qwen2")
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'system' %}<{{ m['role'] }}>{{ m['content'] }}"
                         "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    assert not system_role_ok(tok)
    assert tok.decode(prompt_token_ids(tok, CONVO, "chat")) == f"<user>{SYSTEM}\n\n{QUESTION}<assistant>"


def test_fold_system_touches_only_the_first_user_turn():
    turns = [*CONVO, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert fold_system(turns) == [{"role": "user", "content": f"{SYSTEM}\n\n{QUESTION}"},
                                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]
    assert fold_system(CONVO[1:]) == CONVO[1:]
    assert turns[1]["content"] == QUESTION  # the caller's messages are not modified
