"""``fedllm chat`` prints its answers as they are generated, guards against the loops a small model
falls into, stops at the chat template's end of turn, and says what it is doing while it loads
(issue 35: a SmolLM2 reply took minutes, printed nothing until done, and repeated one clause x8)."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from fedllm.cli import main
from fedllm.decoding import AnswerOnly, Decoding, stop_ids

pytestmark = pytest.mark.slow
PLAIN = Decoding(max_new_tokens=40, repetition_penalty=1.0, no_repeat_ngram_size=0)


def _repeated_ngrams(ids: list[int], n: int) -> set[tuple[int, ...]]:
    seen, again = set(), set()
    for i in range(len(ids) - n + 1):
        gram = tuple(ids[i:i + n])
        (again if gram in seen else seen).add(gram)
    return again


def test_the_guards_see_the_answer_only():
    """Prepare a prompt [1, 2, 3] and an answer; Execute each guard; Assert what it changed."""
    from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    scores = torch.ones(1, 6)
    ban = AnswerOnly(NoRepeatNGramLogitsProcessor(2), prompt_len=3)
    assert torch.isinf(ban(torch.tensor([[1, 2, 3, 4, 5, 4]]), scores.clone())[0, 5])  # "4 5" again: banned
    assert not torch.isinf(ban(torch.tensor([[1, 2, 3, 1]]), scores.clone())).any()  # "1 2" is the prompt's
    pen = AnswerOnly(RepetitionPenaltyLogitsProcessor(2.0), prompt_len=3)
    out = pen(torch.tensor([[1, 2, 3, 4]]), scores.clone())
    assert out[0, 4] == 0.5 and out[0, 1] == 1.0  # the answer's token 4 penalized, the question's 1 free
    assert torch.equal(pen(torch.tensor([[1, 2, 3]]), scores.clone()), scores)  # nothing generated yet
    assert [len(Decoding().processors(3)), len(PLAIN.processors(3))] == [2, 0]
    for bad in ({"repetition_penalty": 0.9}, {"no_repeat_ngram_size": -1}, {"max_new_tokens": 0}):
        with pytest.raises(Exception, match="expected"):
            Decoding(**bad)


def test_answers_stop_at_the_templates_end_of_turn(tiny_run_model):
    _, model, tok = tiny_run_model
    stops = stop_ids(tok, model)
    # SmolLM2's tokenizer (the tiny preset shares it): <|im_end|> ends a turn, <|endoftext|> the text,
    # and a new <|im_start|> turn is not part of this answer
    assert {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>")} <= set(stops)
    assert tok.eos_token_id in stops


def test_the_default_guards_break_the_loop_plain_greedy_falls_into(tiny_run_model):
    from fedllm.serve import answer_ids, conversation

    recipe, model, tok = tiny_run_model
    msgs = conversation(recipe, [], "What helps with anxiety?")
    plain = answer_ids(model, tok, msgs, PLAIN)
    assert _repeated_ngrams(plain, 4), tok.decode(plain)  # the tiny model loops, as SmolLM2 did
    guarded = answer_ids(model, tok, msgs, Decoding(max_new_tokens=40))
    assert not _repeated_ngrams(guarded, 4), tok.decode(guarded)


def test_chat_streams_each_answer_as_it_is_generated(tiny_run_model):
    from fedllm.serve import chat_loop, conversation, respond

    recipe, model, tok = tiny_run_model
    pieces: list[str] = []
    lines: list[str] = []
    d = Decoding(max_new_tokens=24)
    assert chat_loop(recipe, model, tok, iter(["What helps with anxiety?"]), lines.append, d, pieces.append) == 1
    answer = respond(model, tok, conversation(recipe, [], "What helps with anxiety?"), d)
    assert lines == [] and pieces[0] == "assistant> " and pieces[-1] == "\n"
    assert len(pieces) > 3  # word by word, not the whole answer at the end
    assert "".join(pieces[1:-1]).strip() == answer


def test_chat_command_says_it_loads_then_streams(tiny_run_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What helps with anxiety?\n/exit\n"))
    assert main(["chat", str(tiny_run_dir), "--max-new-tokens", "8", "--no-repeat-ngram", "3"]) == 0
    out, err = capsys.readouterr()
    assert "model loaded in" in err and "(merged:" in err  # chat's default form: see the next test
    assert "no repeated 3-grams" in err and "repetition penalty 1.15" in err
    assert out.startswith("assistant> ") and out.endswith("\n") and out.count("\n") >= 1


def test_the_merged_weights_chat_answers_with_are_the_runs(tiny_run_dir, tiny_run_model):
    """chat's default ``--weights merged``: the run's NF4-rounded base in fp32 with the adapter merged
    computes the same function as the 4-bit base + adapter (only faster per token on a CPU)."""
    from fedllm.data.text import prompt_token_ids
    from fedllm.serve import conversation, load_run_model

    recipe, model, tok = tiny_run_model
    _, merged, _ = load_run_model(tiny_run_dir, "merged")
    ids = torch.tensor([prompt_token_ids(tok, conversation(recipe, [], "What helps with anxiety?"), "chat")])
    with torch.no_grad():
        gap = (merged(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()
    assert gap < 1e-3, gap


@pytest.mark.parametrize("flag", [["--repetition-penalty", "0.5"], ["--no-repeat-ngram", "-2"]])
def test_bad_decoding_flags_are_one_line(tiny_run_dir, capsys, flag):
    assert main(["chat", str(tiny_run_dir), *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedllm: error: ") and flag[0] in err, err
