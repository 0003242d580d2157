"""Fuzzing bad input (hypothesis): malformed recipes and malformed data files.

- Recipes: mutations of recipes/tiny.yaml (deleted keys, wrong types, unknown keys, out-of-range
  numbers), junk YAML, non-mapping roots and bad override strings go through
  ``fedllm.cli.main(["validate", ...])`` in-process. Each must exit 0 or 2 — never raise — and an
  exit 2 prints exactly one line starting with ``fedllm: error:``.
- Data: JSONL / CSV / parquet files with bad lines go through ``build_text_data`` with
  ``data.bad_rows`` error and skip. Every failure is a RecipeError naming the file, and the line
  when a row is at fault.

- Every recipe group (server, robust, selection, hierarchy, attack, privacy, compression, prune,
  checkpoint, faults, ...): junk and *typed* mutations of the fully spelled-out tiny recipe. Typed
  values reach the range checks and compatibility rules; a recipe they leave valid must build the
  FederatedServer and run two rounds on a small state without any exception but RecipeError.
- ``fedllm run`` on a recipe that fails validation exits 2 and writes nothing (no run directory a
  later run or report could take for complete); a bad data file leaves a previous run untouched.
- Over-long and empty rows: a prompt that fills ``data.max_length`` is an error naming its line
  (``bad_rows: error``) or a counted skip; truncated responses are counted.

- Issue 15's inputs: its recipe fields together against the round size (norm factor, no-op
  guard, trimmed-mean and Krum rules); YAML-1.1 float spellings (``1e-4``) read as the numbers
  they spell; ``fedllm validate`` reading the data of mutated data/partition groups; fuzzed
  metrics.jsonl / summary.json / config.yaml for ``fedllm report`` (truncated, junk lines, wrong
  types, NaN/Infinity tokens: a report or one line, exit 0 or 2); damaged and tampered (valid
  checksum) checkpoints for ``--resume`` (resumed, or one RecipeError/IntegrityError line).

The recipe-structure tests pass ``--recipe-only`` (validate's recipe checks, as before it read the
data); the data read by validate is fuzzed by its own test. Runs are derandomized (same examples
every run) so CI stays stable. Generated cases: 450 + 300 + 300 recipes/overrides, 350 + 300 + 120
group recipes, 150 + 120 + 30 data files, and for issue 15: 150 + 120 recipes, 100 validated data
recipes, 150 + 10 run directories, 80 checkpoints = 2,730 (the issue 15 part adds ~35 s on 2 cores).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import re
import typing
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedllm.cli import main
from fedllm.config import Recipe, RecipeError, build, load_recipe
from fedllm.data.build import build_text_data

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
TINY_TEXT = TINY.read_text(encoding="utf-8")
BASE = yaml.safe_load(TINY_TEXT)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: the fuzz loop is dump-bound

FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _field_paths(cls: type, prefix: str = "") -> list[str]:
    """Every dotted field path of the recipe dataclasses (``lora.r``, ``data.path``, ...)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        if dataclasses.is_dataclass(hints[f.name]):
            out += _field_paths(hints[f.name], path + ".")
    return out


PATHS = _field_paths(Recipe)

# ----------------------------------------------------------------------------- strategies

SPECIAL = [None, True, False, 0, -1, 1, 2**31, 2**64, 10**400, -(10**400), 0.5, -0.5, 1e308,
           float("inf"), float("-inf"), float("nan"), "", " ", "tiny", "natral", "nf4", "1e3", "0x10",
           "\n", "a\nb", "\x00", "../..", "/", "C:\\x", [], [1, 2], ["q_proj"], {}, {"a": 1}, [[[]]]]

junk = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
              st.sampled_from(SPECIAL)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.one_of(st.text(max_size=6), st.integers()), inner, max_size=3)),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from([p.rsplit(".", 1)[-1] for p in PATHS] + ["", "lora_r", "rounds"]),
                 st.text(max_size=10), st.integers())

mutation = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(PATHS)),
    st.tuples(st.just("set"), st.sampled_from(PATHS), junk),
    st.tuples(st.just("unknown"), st.sampled_from(["", *[p for p in PATHS if "." not in p]]), keys, junk),
)


def _mutate(values: dict, op: tuple) -> None:
    kind, path = op[0], op[1]
    parts = path.split(".") if path else []
    node = values
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if kind == "delete" and isinstance(node, dict):
        node.pop(parts[-1], None)
    elif kind == "set" and isinstance(node, dict):
        node[parts[-1]] = op[2]
    elif kind == "unknown":
        group = values if not path else values.get(path)
        if isinstance(group, dict):
            group[op[2]] = op[3]


def _splice(text: str, cuts: list[tuple[int, int, str]]) -> str:
    for start, length, insert in cuts:
        i = start % (len(text) + 1)
        text = text[:i] + insert + text[i + length:]
    return text


junk_yaml = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 20),
                       st.sampled_from(["", ":", "{", "}", "[", "- ", "\t", "'", '"', "&a", "*a", "!!python/name:os.system",
                                        "<<: *a", "? ", "\n  ", "%YAML 1.1\n", "---\n", "...\n", "\x00"])),
             min_size=1, max_size=4).map(lambda cuts: _splice(TINY_TEXT, cuts).encode()),
    junk.map(lambda v: yaml.dump(v, Dumper=DUMPER).encode()),  # non-mapping roots (and a few odd mappings)
    st.sampled_from([3, 90, 400, 700]).map(lambda n: ("model: " + "[" * n + "]" * n + "\n").encode()),  # deep nesting
    st.sampled_from([b"", b"\xff\xfe\x00", b"---\n", b"~\n", b"- 1\n", b"a: &a [*a]\n", b"x: 2001-13-45\n",
                     b"seed: " + b"9" * 5000 + b"\n", b"\xef\xbb\xbfname: t\n"]),
)

override_text = st.one_of(
    st.text(max_size=30),
    st.builds(lambda p, v: f"{p}={v}", st.sampled_from(PATHS), st.text(max_size=20)),
    st.builds(lambda p, v: f"{p}={yaml.safe_dump(v, default_flow_style=True).strip()}",
              st.sampled_from(PATHS), junk),
    st.builds(lambda p, k, v: f"{p}.{k}={v}", st.sampled_from(PATHS), st.text(max_size=6), st.text(max_size=6)),
    st.sampled_from(["=", "=1", "a", "a..b=1", ".a=1", "a.=1", "lora=1", "lora.r.x=1", "name.x=1",
                     "seed=" + "9" * 5000, "seed=" + "[" * 700, "data={a: b}", "lora.r=!!binary AAAA"]),
).filter(lambda s: not s.startswith("-"))  # leading dashes: see test_dash_overrides_are_one_line_errors


# ----------------------------------------------------------------------------- recipe checks


RECIPE_ONLY = "--recipe-only"  # the recipe checks alone: data reading is fuzzed by its own tests below


def _validate(args: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["validate", *args])
    return code, err.getvalue()


def _assert_exit_contract(code: int, err: str) -> None:
    assert code in (0, 2), code
    if code == 0:
        assert err == ""
    else:
        assert err.startswith("fedllm: error:"), err
        assert err.endswith("\n") and err.count("\n") == 1 and "\r" not in err, repr(err)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


@settings(FUZZ, max_examples=450)
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_recipes_exit_0_or_2(recipe_file, ops):
    # Prepare
    values = copy.deepcopy(BASE)
    for op in ops:
        _mutate(values, op)
    recipe_file.write_text(yaml.dump(values, Dumper=DUMPER, allow_unicode=True), encoding="utf-8")
    # Execute
    code, err = _validate([str(recipe_file), RECIPE_ONLY])
    # Assert
    _assert_exit_contract(code, err)


@settings(FUZZ, max_examples=300)
@given(blob=junk_yaml)
def test_junk_yaml_exits_0_or_2(recipe_file, blob):
    recipe_file.write_bytes(blob)
    code, err = _validate([str(recipe_file), RECIPE_ONLY])
    _assert_exit_contract(code, err)


@settings(FUZZ, max_examples=300)
@given(overrides=st.lists(override_text, min_size=1, max_size=3))
def test_bad_overrides_exit_0_or_2(overrides):
    code, err = _validate([str(TINY), *overrides, RECIPE_ONLY])
    _assert_exit_contract(code, err)


@pytest.mark.parametrize("args,expected", [
    (["--lora.r=4"], 2), (["-x"], 2), (["--", "-lora.r=4"], 2), (["--nope"], 2),
    (["lora.r=4", "--"], 0),  # a trailing "--" only ends the options: the override still applies
])
def test_dash_arguments_follow_the_exit_contract(args, expected):
    # argparse's own errors must follow the same contract (one line, exit 2, no SystemExit)
    code, err = _validate([str(TINY), *args])
    _assert_exit_contract(code, err)
    assert code == expected


@pytest.mark.parametrize("override,expected", [
    ("seed=-1", "seed: expected an integer in [0, 2**32)"),
    ("train.lr=.inf", "train.lr: expected a finite number"),
    ("lora.alpha=.nan", "lora.alpha: expected a finite number"),
    ("partition.alpha=" + "9" * 400, "partition.alpha: expected a finite number"),
    ("seed=" + "9" * 5000, "seed: expected int"),
    ("name=a\\b", "name: expected a plain folder name"),
    ("data.path=", "data.path: file '' does not exist"),
    ("lora.rr\n=4", "lora.rr\\n: unknown key"),
])
def test_found_bugs_now_clear_errors(override, expected):
    extra = ["data.builtin=null"] if override.startswith("data.path") else []
    code, err = _validate([str(TINY), *extra, override])
    _assert_exit_contract(code, err)
    assert code == 2 and err.startswith(f"fedllm: error: {expected}"), err


def test_deep_and_huge_yaml_name_the_file(recipe_file):
    for blob in (b"model: " + b"[" * 700 + b"]" * 700, b"seed: " + b"9" * 5000, b"x: 2001-13-45"):
        recipe_file.write_bytes(blob)
        code, err = _validate([str(recipe_file)])
        _assert_exit_contract(code, err)
        assert code == 2 and str(recipe_file) in err


# ----------------------------------------------------------------------------- data files


@pytest.fixture(scope="module")
def tokenizer():
    from fedllm.models.llm import load_tokenizer, smollm2_tokenizer_dir

    return load_tokenizer(smollm2_tokenizer_dir())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzzdata")


def _recipe(path: Path, bad_rows: str, messages: bool = False, column: bool = False) -> Recipe:
    over = ["data.builtin=null", f"data.path={path}", f"data.bad_rows={bad_rows}", "data.eval_size=1",
            "data.max_examples=null", "data.max_length=64", "partition.num_clients=1",
            "partition.method=natural" if column else "partition.method=iid",
            "partition.column=topic" if column else "partition.column=null",
            "partition.merge_values=true"]  # one client holds every topic
    if messages:
        over.append("data.messages_field=messages")
    return load_recipe(TINY, over)


LINE_FAULT = re.compile(r" (line|row) \d+: ")


def _assert_data_contract(recipe: Recipe, tokenizer, path: Path) -> None:
    try:
        data = build_text_data(recipe, tokenizer)
    except RecipeError as exc:
        msg = str(exc)
        assert "\n" not in msg and str(path) in msg, msg
        if "field " in msg:  # a row is at fault: its line/row is named
            assert LINE_FAULT.search(msg), msg
        event("row error" if LINE_FAULT.search(msg) else "file error")
        return
    except Exception as exc:  # pragma: no cover - the failure this test exists to catch
        pytest.fail(f"{type(exc).__name__} instead of RecipeError: {exc}")
    s = data.stats
    event("loaded, some rows skipped" if s["examples"] < s["rows"] else "loaded")
    assert s["rows"] == s["examples"] + s["skipped_bad_rows"] + s["skipped_no_response_tokens"]
    assert s["examples"] >= 2
    if recipe.data.bad_rows == "error":
        assert s["skipped_bad_rows"] == 0


text_value = st.one_of(st.text(max_size=20), st.sampled_from(["", "  ", "\n", "{{ x }}", "<|im_end|>", "\u2028"]),
                       st.integers(0, 200).map(lambda n: "w " * (n * 100)))  # up to 40k-char lines
field_value = st.one_of(text_value, junk)
good_row = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20).filter(str.strip),
                                  "response": st.text(min_size=1, max_size=20).filter(str.strip),
                                  "topic": st.sampled_from(["a", "b"])})
bad_row = st.dictionaries(st.sampled_from(["prompt", "response", "topic", "messages", "x"]), field_value, max_size=4)
message = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool", "", 1]),
                                           "content": field_value}), junk)
messages_row = st.fixed_dictionaries({"messages": st.one_of(st.lists(message, max_size=4), junk),
                                      "topic": st.sampled_from(["a", "b"])})
jsonl_line = st.one_of(
    good_row.map(json.dumps), bad_row.map(lambda r: json.dumps(r, allow_nan=True)),
    messages_row.map(json.dumps), junk.map(json.dumps),  # non-object JSON values
    st.text(max_size=30),  # not JSON
    st.sampled_from(["", "   ", "{", '{"prompt": "a",}', "[" * 5000 + "]" * 5000, '{"prompt": ' + "1" * 5000 + "}",
                     "\ufeff{}", "NaN"]),
).map(str.encode)
raw_line = st.one_of(jsonl_line, jsonl_line, jsonl_line, st.binary(max_size=40))


@settings(FUZZ, max_examples=150)
@given(lines=st.lists(raw_line, max_size=8), bad_rows=st.sampled_from(["error", "skip"]),
       messages=st.booleans(), column=st.booleans())
def test_malformed_jsonl_gives_recipe_errors(tokenizer, data_dir, lines, bad_rows, messages, column):
    path = data_dir / "data.jsonl"
    path.write_bytes(b"\n".join(lines))
    _assert_data_contract(_recipe(path, bad_rows, messages, column), tokenizer, path)


csv_cell = st.one_of(st.text(max_size=15), st.sampled_from(['"', '""', "a,b", "x\ny", "\x00", "a" * 140_000]))


@settings(FUZZ, max_examples=120)
@given(header=st.lists(st.sampled_from(["prompt", "response", "topic", "x", "", "prompt "]), max_size=4),
       rows=st.lists(st.lists(csv_cell, max_size=5), max_size=6),
       junk_bytes=st.one_of(st.just(b""), st.binary(max_size=30)),
       bad_rows=st.sampled_from(["error", "skip"]), column=st.booleans())
def test_malformed_csv_gives_recipe_errors(tokenizer, data_dir, header, rows, junk_bytes, bad_rows, column):
    path = data_dir / "data.csv"
    buf = io.StringIO()
    writer = __import__("csv").writer(buf)
    for r in ([header] if header else []) + rows:
        writer.writerow(r)
    path.write_bytes(buf.getvalue().encode() + junk_bytes)
    _assert_data_contract(_recipe(path, bad_rows, column=column), tokenizer, path)


@settings(FUZZ, max_examples=30)
@given(blob=st.one_of(st.binary(max_size=200), st.binary(max_size=200).map(lambda b: b"PAR1" + b + b"PAR1")))
def test_junk_parquet_gives_recipe_errors(tokenizer, data_dir, blob):
    path = data_dir / "data.parquet"
    path.write_bytes(blob)
    _assert_data_contract(_recipe(path, "skip"), tokenizer, path)


# ----------------------------------------------------------------------------- pinned data faults

GOOD = '{"prompt": "p%d", "response": "r%d", "topic": "t"}'
GOOD_CHAT = '{"messages": [{"role": "user", "content": "p%d"}, {"role": "assistant", "content": "r%d"}]}'


@pytest.mark.parametrize("bad_line,expected", [
    ('{"prompt": "p", "response": ""}', "line 3: field 'response': expected a non-empty string"),
    ('{"prompt": 5, "response": "r"}', "line 3: field 'prompt': expected a non-empty string"),
    ('{"prompt": "p", "response": "r", "topic": [1]}', "line 3: field 'topic': expected a string or number label"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "line 3: field 'messages': expected a user message"),
    ('{"messages": [{"role": 1, "content": "x"}, {"role": "assistant", "content": "y"}]}',
     "line 3: field 'messages': expected a list of {role, content} messages"),
    ("[1, 2]", "line 3: expected a JSON object per line"),
    ('{"prompt": "a",', "line 3: not valid JSON"),
    ("[" * 5000 + "]" * 5000, "line 3: not valid JSON (nested too deeply)"),
    ('{"prompt": ' + "1" * 5000 + "}", "line 3: not valid JSON"),
    (b'{"prompt": "\xff"}', "line 3: not UTF-8 text"),
])
def test_bad_jsonl_line_is_named(tokenizer, data_dir, bad_line, expected):
    # Prepare: line 2 is blank, so the bad row (3rd line) is the 2nd row: the message must say line 3
    path = data_dir / "pinned.jsonl"
    bad = bad_line if isinstance(bad_line, bytes) else bad_line.encode()
    messages, column = b"messages" in bad, b"topic" in bad
    good = GOOD_CHAT if messages else GOOD
    path.write_bytes(f"{good % (1, 1)}\n\n".encode() + bad + f"\n{good % (2, 2)}\n{good % (3, 3)}\n".encode())
    # Execute
    with pytest.raises(RecipeError) as info:
        build_text_data(_recipe(path, "error", messages, column), tokenizer)
    # Assert
    assert str(info.value).startswith(f"{path} {expected}"), str(info.value)


def test_skip_mode_counts_bad_rows(tokenizer, data_dir):
    path = data_dir / "skip.jsonl"
    path.write_text("\n".join([GOOD % (1, 1), '{"prompt": "p"}', GOOD % (2, 2), '{"response": 3}', GOOD % (3, 3)]))
    data = build_text_data(_recipe(path, "skip"), tokenizer)
    assert data.stats["skipped_bad_rows"] == 2 and data.stats["examples"] == 3


@pytest.mark.parametrize("text,expected", [
    ("prompt,response\nq1,r1\n\"q2\nstill q2\",\nq3,r3\n", "line 3: field 'response': expected a non-empty string"),
    ("prompt,response\nq1,r1\nq2\n", "line 3: field 'response': expected a non-empty string"),  # no column at
    # all is named with the file's columns instead (tests/test_front_door_frictions.py)
    ("prompt,response\nq1,r1\n" + "a" * 140_000 + ",r\n", "line 3: not valid CSV"),
    ("", ": contains no rows"),
    ("prompt,response\n", ": contains no rows"),
])
def test_bad_csv_row_is_named(tokenizer, data_dir, text, expected):
    path = data_dir / "pinned.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        build_text_data(_recipe(path, "error"), tokenizer)
    assert str(info.value).startswith(f"{path}{'' if expected.startswith(':') else ' '}{expected}"), str(info.value)


def test_csv_with_bom_reads_its_header(tokenizer, data_dir):
    path = data_dir / "bom.csv"
    path.write_bytes("\ufeffprompt,response\nq1,r1\nq2,r2\nq3,r3\n".encode())
    assert build_text_data(_recipe(path, "error"), tokenizer).stats["examples"] == 3


# ----------------------------------------------------------------------------- over-long and empty rows

LONG_PROMPT = '{"prompt": "' + "word " * 200 + '", "response": "r", "topic": "t"}'
LONG_RESPONSE = '{"prompt": "p", "response": "' + "word " * 200 + '", "topic": "t"}'


def test_prompt_filling_max_length_is_an_error_naming_its_line(tokenizer, data_dir):
    # Prepare: line 2's prompt alone is longer than data.max_length=64 tokens
    path = data_dir / "long.jsonl"
    path.write_text("\n".join([GOOD % (1, 1), LONG_PROMPT, GOOD % (2, 2), GOOD % (3, 3)]), encoding="utf-8")
    # Execute
    with pytest.raises(RecipeError) as info:
        build_text_data(_recipe(path, "error"), tokenizer)
    # Assert
    msg = str(info.value)
    assert msg.startswith(f"{path} line 2: the prompt takes ") and "data.max_length=64" in msg, msg
    assert "data.bad_rows: skip" in msg and "\n" not in msg


def test_skip_mode_counts_long_prompts_and_truncated_responses(tokenizer, data_dir, caplog):
    path = data_dir / "long_skip.jsonl"
    path.write_text("\n".join([GOOD % (1, 1), LONG_PROMPT, LONG_RESPONSE, '{"prompt": " ", "response": "r"}',
                               GOOD % (2, 2)]), encoding="utf-8")
    with caplog.at_level("WARNING", logger="fedllm.data.build"):
        data = build_text_data(_recipe(path, "skip"), tokenizer)
    s = data.stats
    assert (s["rows"], s["examples"], s["skipped_bad_rows"], s["skipped_no_response_tokens"], s["truncated"]) == \
        (5, 3, 1, 1, 1)
    assert all(len(e.input_ids) <= 64 for e in data.examples)
    assert "skipped 2 of 5 rows (1 malformed, 1 with no room for a response" in caplog.text
    assert "first: line 2, line 4" in caplog.text


def test_builtin_rows_that_do_not_fit_are_skipped_and_counted(tokenizer, monkeypatch):
    # the built-in corpus cannot be edited by the user: its long rows are dropped under either policy
    # (its rows are stubbed here: building coralmap takes seconds)
    import fedllm.data.build as build_mod

    rows = [json.loads(GOOD % (i, i)) for i in range(4)] + [json.loads(LONG_PROMPT)]
    monkeypatch.setattr(build_mod, "load_records",
                        lambda cfg: (rows, "builtin:coralmap", [f"row {i}" for i in range(1, 6)]))
    recipe = load_recipe(TINY, ["data.max_length=64", "data.system_prompt=null", "data.bad_rows=error",
                                "partition.method=iid", "partition.num_clients=1", "data.eval_size=1"])
    s = build_text_data(recipe, tokenizer).stats
    assert (s["rows"], s["examples"], s["skipped_no_response_tokens"], s["skipped_bad_rows"]) == (5, 4, 1, 0)


def test_empty_assistant_message_is_a_bad_row(tokenizer, data_dir):
    path = data_dir / "empty_chat.jsonl"
    empty = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}'
    path.write_text("\n".join([GOOD_CHAT % (1, 1), empty, GOOD_CHAT % (2, 2), GOOD_CHAT % (3, 3)]), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"line 2: field 'messages': the assistant's response is empty"):
        build_text_data(_recipe(path, "error", messages=True), tokenizer)
    assert build_text_data(_recipe(path, "skip", messages=True), tokenizer).stats["skipped_bad_rows"] == 1


# ----------------------------------------------------------------------------- every recipe group
# tiny.yaml leaves most groups at their defaults, so mutating it never reaches them: FULL spells out
# every group (the resolved tiny recipe), and typed mutations reach the compatibility rules and the
# server's construction instead of stopping at a type error.

FULL = load_recipe(TINY).to_dict()
GROUPS = ("federation", "server", "robust", "selection", "hierarchy", "attack", "privacy", "compression",
          "prune", "checkpoint", "faults", "partition", "train", "eval")
GROUP_PATHS = [p for p in PATHS if "." in p and p.split(".")[0] in GROUPS]


def _hint(path: str):
    cls, *parts = Recipe, *path.split(".")
    for part in parts[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)[parts[-1]]


# a nested group (privacy.audit) is fuzzed through its own fields, not as one value
GROUP_PATHS = [p for p in GROUP_PATHS if not dataclasses.is_dataclass(_hint(p))]


def _typed(tp) -> st.SearchStrategy:
    """Values of the field's own type, around and beyond its valid range."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, __import__("types").UnionType):
        return st.one_of(*[_typed(a) for a in args])
    if origin is list:
        return st.lists(_typed(args[0]), max_size=3)
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.integers(-2, 12), st.sampled_from([0, 1, 100, 10**6]))
    if tp is float:
        return st.one_of(st.floats(-0.5, 1.5, allow_nan=False), st.sampled_from([0.0, 1e-9, 0.5, 1.0, 1e3, 1e9]))
    if tp is str:
        return st.sampled_from(["", "x", "topic", "q_proj"])
    raise AssertionError(f"no strategy for {tp}")


group_mutation = st.sampled_from(GROUP_PATHS).flatmap(lambda p: st.tuples(st.just("set"), st.just(p), _typed(_hint(p))))


@settings(FUZZ, max_examples=350)
@given(ops=st.lists(st.one_of(mutation.filter(lambda op: op[1].split(".")[0] in GROUPS), group_mutation),
                    min_size=1, max_size=4))
def test_mutated_groups_exit_0_or_2(recipe_file, ops):
    values = copy.deepcopy(FULL)
    for op in ops:
        _mutate(values, op)
    recipe_file.write_text(yaml.dump(values, Dumper=DUMPER, allow_unicode=True), encoding="utf-8")
    code, err = _validate([str(recipe_file), RECIPE_ONLY])
    _assert_exit_contract(code, err)
    event(f"exit {code}")


def _one_round(recipe: Recipe) -> None:
    """What `fedllm run` builds after validation, on a small linear state: the server and one round."""
    import torch

    from fedllm.federation.server import FederatedServer
    from fedllm.types import ClientUpdate

    state = {"lin.weight": torch.zeros(3, 4), "lin.bias": torch.zeros(3)}
    server = FederatedServer(recipe, state, [5 + k for k in range(recipe.partition.num_clients)])
    gen = torch.Generator().manual_seed(0)
    for rnd in (1, 2):
        plan = server.begin_round(rnd)
        for k in plan.training:
            start = server.start_state(k, state)
            server.grad_term(k, start)
            delta = {n: 0.01 * torch.randn(v.shape, generator=gen) for n, v in start.items()}
            server.upload(rnd, ClientUpdate(k, delta, 5 + k, plan.steps[k], 1.0), start)
        state, metrics = server.finish_round(rnd, state)
        assert isinstance(metrics["applied"], bool)


def _refused_or_runs(values: dict) -> None:
    """A RecipeError of one line, or a server that runs two rounds (anything else: a traceback in ``fedllm run``)."""
    try:
        recipe = build(Recipe, values)
    except RecipeError as exc:
        assert "\n" not in str(exc)
        event("rejected")
        return
    event("accepted: ran two rounds")
    try:
        _one_round(recipe)
    except RecipeError as exc:
        assert "\n" not in str(exc)


@settings(FUZZ, max_examples=300)
@given(ops=st.lists(group_mutation, min_size=1, max_size=5))
def test_valid_group_combinations_build_a_server_without_traceback(ops):
    # Prepare: typed values in the recipe groups; most combinations are rejected by a check or a
    # compatibility rule, the rest must run a round
    values = copy.deepcopy(FULL)
    values["partition"]["num_clients"] = 6
    values["partition"]["method"] = "iid"
    for op in ops:
        _mutate(values, op)
    # Execute / Assert
    _refused_or_runs(values)


@settings(FUZZ, max_examples=120)
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_failed_validation_leaves_no_run_directory(tmp_path_factory, ops):
    # Prepare
    out = tmp_path_factory.mktemp("runs")
    recipe_path = out / "recipe.yaml"
    values = copy.deepcopy(FULL)
    for op in ops:
        _mutate(values, op)
    recipe_path.write_text(yaml.dump(values, Dumper=DUMPER, allow_unicode=True), encoding="utf-8")
    code, _ = _validate([str(recipe_path), RECIPE_ONLY])
    if code == 0:  # a valid recipe would train: not this test's business
        event("valid: not run")
        return
    # Execute
    o, e = io.StringIO(), io.StringIO()
    with redirect_stdout(o), redirect_stderr(e):
        run_code = main(["run", str(recipe_path), "--out", str(out)])
    # Assert: the same one-line error, and nothing that a later run or report could take for a run
    _assert_exit_contract(run_code, e.getvalue())
    assert run_code == 2
    assert sorted(p.name for p in out.iterdir()) == ["recipe.yaml"]
    event("invalid: exit 2, no run dir")


def test_bad_data_file_at_run_time_leaves_the_previous_run_untouched(tmp_path, data_dir):
    # Prepare: a finished run of the same name exists; the new run's data has a bad line 2
    path = data_dir / "run_bad.jsonl"
    path.write_text("\n".join([GOOD % (1, 1), '{"prompt": "p"}', GOOD % (2, 2)]), encoding="utf-8")
    old = tmp_path / "tiny" / "federated"
    old.mkdir(parents=True)
    (old / "summary.json").write_text('{"rounds": 2}', encoding="utf-8")
    # Execute
    o, e = io.StringIO(), io.StringIO()
    with redirect_stdout(o), redirect_stderr(e):
        code = main(["run", str(TINY), "data.builtin=null", f"data.path={path}", "--out", str(tmp_path)])
    # Assert
    _assert_exit_contract(code, e.getvalue())
    assert code == 2 and f"{path} line 2: field 'response'" in e.getvalue()
    assert sorted(p.name for p in old.iterdir()) == ["summary.json"]
    assert (old / "summary.json").read_text(encoding="utf-8") == '{"rounds": 2}'


# ----------------------------------------------------------------------------- issue 15's new inputs
# The typed group mutations above walk every dataclass field, so the fields issue 15 added are in
# them; the tests below name them, hit them together, and fuzz the other new inputs: data read by
# `fedllm validate`, YAML-1.1 float spellings, metrics.jsonl/summary.json for `fedllm report`, and
# checkpoints for `--resume`.

ISSUE_15_FIELDS = ("federation.reject_norm_factor", "federation.max_change_ratio", "train.noop_guard",
                   "robust.trim_ratio", "robust.byzantine", "robust.aggregator", "robust.multi")


def test_the_fields_of_issue_15_are_in_the_typed_mutations():
    assert set(ISSUE_15_FIELDS) <= set(GROUP_PATHS)
    for path in ISSUE_15_FIELDS:
        assert _typed(_hint(path)) is not None


ROUND_SIZE_PATHS = ("federation.fraction", "federation.min_clients", "partition.num_clients")
issue_15_mutation = st.sampled_from(ISSUE_15_FIELDS + ROUND_SIZE_PATHS).flatmap(
    lambda p: st.tuples(st.just("set"), st.just(p), _typed(_hint(p))))


@settings(FUZZ, max_examples=150)
@given(ops=st.lists(issue_15_mutation, min_size=1, max_size=5))
def test_issue_15_fields_together_are_refused_in_one_line_or_run(ops):
    # Prepare: the norm factor, no-op guard, trimmed-mean and Krum rules against the round size
    values = copy.deepcopy(FULL)
    values["partition"]["method"] = "iid"
    for op in ops:
        _mutate(values, op)
    # Execute / Assert
    _refused_or_runs(values)


FLOAT_PATHS = [p for p in GROUP_PATHS if float in (typing.get_args(_hint(p)) or (_hint(p),))]
FLOAT_SPELLINGS = ["1e-4", "1E-4", "-1e-4", "1e+3", "1.5e-3", "2E1", "1e400", "-1e400", "1e-400", "1e", "e4",
                   "1_0e2", ".5e1", "+1e-2", "1e-4 ", "1e--4", "0x1p-3"]


@settings(FUZZ, max_examples=120)
@given(path=st.sampled_from(FLOAT_PATHS), spelling=st.sampled_from(FLOAT_SPELLINGS))
def test_yaml_float_spellings_are_numbers_or_one_line_errors(path, spelling):
    code, err = _validate([str(TINY), f"{path}={spelling}", RECIPE_ONLY])
    _assert_exit_contract(code, err)
    if code == 0 and spelling.strip() not in ("1_0e2",):
        value = load_recipe(TINY, [f"{path}={spelling}"])
        for part in path.split("."):
            value = getattr(value, part)
        assert value == float(spelling), (path, spelling, value)  # read as the number it spells
    event(f"exit {code}")


# ----------------------------------------------------------------------------- validate reads the data


@pytest.fixture(scope="module")
def small_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("validate") / "small.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": f"answer {i}.",
                                        "topic": "abc"[i % 3]}) + "\n" for i in range(12)), encoding="utf-8")
    return path


DATA_GROUP_PATHS = [p for p in PATHS if p.split(".")[0] in ("data", "partition") and "." in p]
data_mutation = st.one_of(
    st.sampled_from(DATA_GROUP_PATHS).flatmap(lambda p: st.tuples(st.just("set"), st.just(p), _typed(_hint(p)))),
    st.sampled_from(DATA_GROUP_PATHS).flatmap(lambda p: st.tuples(st.just("set"), st.just(p), _typed(_hint(p)))),
    st.tuples(st.just("set"), st.sampled_from(DATA_GROUP_PATHS), junk),
    st.tuples(st.just("delete"), st.sampled_from(DATA_GROUP_PATHS)),
)


@settings(FUZZ, max_examples=100)
@given(ops=st.lists(data_mutation, min_size=1, max_size=2))
def test_mutated_data_groups_validate_with_the_data_in_one_line(recipe_file, small_jsonl, ops):
    # Prepare: a valid recipe over a small JSONL file (12 rows, 3 topics), then its data/partition mutated
    values = copy.deepcopy(FULL)
    values["data"].update(builtin=None, path=str(small_jsonl), max_examples=None, eval_size=2)
    values["partition"].update(method="natural", column="topic", num_clients=3)
    for op in ops:
        _mutate(values, op)
    recipe_file.write_text(yaml.dump(values, Dumper=DUMPER, allow_unicode=True), encoding="utf-8")
    # Execute: validate reads, tokenizes and partitions the data
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["validate", str(recipe_file)])
    # Assert: one line naming the file when a row is at fault; an ok line counts the data
    _assert_exit_contract(code, err.getvalue())
    if code == 0:
        assert "training examples" in out.getvalue(), out.getvalue()
    elif LINE_FAULT.search(err.getvalue()):
        assert str(small_jsonl) in err.getvalue(), err.getvalue()
    event(f"exit {code}")


# ----------------------------------------------------------------------------- metrics.jsonl for `report`


def _metrics_row(r: int) -> dict:
    return {"round": r, "mode": "federated", "train_loss": None if r == 0 else 2.0 - 0.1 * r,
            "eval_loss": 2.5 - 0.1 * r, "perplexity": 12.0 - r, "bleu": 0.0, "accuracy": None,
            "round_time_s": float(r > 0), "train_time_s": 0.5, "aggregate_time_s": 0.1, "eval_time_s": 0.1,
            "bytes_up": 100 * r, "bytes_down": 100 * r, "clients": [0, 1], "rejected_updates": 0,
            "failed_clients": 0, "epsilon": 0.1 * r, "per_client": {"0": {"eval_loss": 2.0}, "1": {"eval_loss": 2.1}}}


ROW_KEYS = sorted(_metrics_row(1)) + ["lora_aggregation_error", "skipped_nonfinite"]
row_value = st.one_of(junk, st.sampled_from([float("nan"), float("inf"), float("-inf"), -1, 2**63, 10**30, True,
                                             "1.5", 1.5, 0, None, [], {"0": {"eval_loss": "x"}}, {"0": 1}]))
value_op = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 4), st.sampled_from(ROW_KEYS), row_value),
    st.tuples(st.just("token"), st.integers(0, 4), st.sampled_from(["eval_loss", "perplexity", "bleu", "epsilon",
                                                                    "round_time_s", "bytes_up", "round"]),
              st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0", "01", "1.0", "true"])),
)
row_op = st.one_of(
    value_op,
    st.tuples(st.just("delete"), st.integers(0, 4), st.sampled_from(ROW_KEYS)),
    st.tuples(st.just("line"), st.integers(0, 5), st.one_of(
        st.sampled_from(["{", "[]", "null", "NaN", '{"round": NaN}', "\x00", "{}", '"row"', "1e999"]),
        st.text(max_size=20))),
)


def _metrics_text(ops: list[tuple], cut: int | None) -> str:
    rows = [_metrics_row(r) for r in range(4)]
    extra: dict[int, str] = {}
    tokens: list[tuple[int, str, str]] = []
    for op in ops:
        kind, i = op[0], op[1]
        if kind == "line":
            extra[i] = op[2]
        elif i < len(rows) and kind == "set":
            rows[i][op[2]] = op[3]
        elif i < len(rows) and kind == "delete":
            rows[i].pop(op[2], None)
        elif i < len(rows):
            tokens.append((i, op[2], op[3]))
    lines = []
    for i, row in enumerate(rows):
        if i in extra:
            lines.append(extra[i])
        text = json.dumps(row)
        for j, key, token in tokens:  # spliced as raw JSON text (NaN, Infinity, 1e999, ...)
            if j == i and key in row:
                text = json.dumps({**row, key: "@@"}).replace('"@@"', token)
        lines.append(text)
    lines += [extra[i] for i in extra if i >= len(rows)]
    text = "\n".join(lines) + "\n"
    return text if cut is None else text[:cut]


summary_text = st.one_of(
    st.none(), st.none(), st.none(),
    st.just(json.dumps({"name": "demo", "total_bytes_up": 1, "total_bytes_down": 2, "mean_round_time_s": 1.0,
                        "skipped_updates": 0})),
    st.fixed_dictionaries({"total_bytes_up": row_value, "total_bytes_down": st.just(0),
                           "mean_round_time_s": st.just(1.0), "skipped_updates": st.just(0),
                           "name": st.one_of(st.just("demo"), junk)}).map(json.dumps),
    st.binary(max_size=30).map(lambda b: b.decode("latin-1")),
)
config_text = st.one_of(st.none(), st.none(), st.none(), st.just("eval: {targets: [0.5, 0.9]}\n"),
                        junk.map(lambda v: yaml.dump({"eval": {"targets": v}}, Dumper=DUMPER)),
                        st.sampled_from(["eval: [", "- 1\n", "eval: {targets: [.nan]}\n", "\x00"]))


def _report(run: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["report", str(run)])
    return code, err.getvalue()


def _assert_report_contract(run: Path, code: int, err: str) -> None:
    """exit 0 with a report.md, or exit 2 with one error line (log warnings may precede it)."""
    assert code in (0, 2), (code, err)
    errors = [line for line in err.splitlines() if line.startswith("fedllm: error:")]
    assert "Traceback" not in err
    if code == 0:
        assert errors == [] and (run / "report.md").is_file(), err
    else:
        assert len(errors) == 1 and err.endswith(errors[0] + "\n") and "\r" not in errors[0], repr(err)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report") / "demo" / "federated"


def _write_run(run: Path, metrics: str, summary: str | None, config: str | None) -> None:
    if run.exists():
        __import__("shutil").rmtree(run)
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(metrics, encoding="utf-8", errors="surrogatepass")
    if summary is not None:
        (run / "summary.json").write_text(summary, encoding="utf-8", errors="surrogatepass")
    if config is not None:
        (run / "config.yaml").write_text(config, encoding="utf-8", errors="surrogatepass")


@settings(FUZZ, max_examples=150)
@given(ops=st.lists(row_op, max_size=3), cut=st.one_of(st.none(), st.none(), st.integers(0, 3000)),
       summary=summary_text, config=config_text)
def test_fuzzed_run_files_give_a_report_or_one_line(report_dir, ops, cut, summary, config):
    # Prepare: truncated files, junk lines, wrong types, NaN/Infinity tokens, odd summaries/configs
    _write_run(report_dir, _metrics_text(ops, cut), summary, config)
    # Execute: the figure is built (limits, labels, NaN filtering) but not rendered to PNG (a second each)
    from matplotlib.figure import Figure

    with __import__("unittest.mock").mock.patch.object(Figure, "savefig", lambda self, *a, **k: None):
        code, err = _report(report_dir)
    # Assert
    _assert_report_contract(report_dir, code, err)
    event(f"exit {code}")


@settings(FUZZ, max_examples=10)
@given(ops=st.lists(value_op, min_size=1, max_size=3))
def test_fuzzed_metric_values_render_to_png_or_one_line(report_dir, ops):
    _write_run(report_dir, _metrics_text(ops, None), None, None)
    code, err = _report(report_dir)
    _assert_report_contract(report_dir, code, err)
    if code == 0:
        assert (report_dir / "metrics.png").stat().st_size > 0
    event(f"exit {code}")


# ----------------------------------------------------------------------------- checkpoints for `--resume`


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[Recipe, Path]:
    """A toy run with checkpoints of rounds 2 and 3 of 4, stopped (no summary.json)."""
    from fedllm.federation.modes import run_federated
    from tests._toy import ToyExperiment, toy_recipe

    root = tmp_path_factory.mktemp("resume")
    recipe = toy_recipe(checkpoint={"enabled": True, "keep": 2}, federation={"rounds": 3})
    run_federated(ToyExperiment(recipe), out=str(root))
    (root / "toy" / "federated" / "summary.json").unlink()
    return toy_recipe(checkpoint={"enabled": True, "keep": 2}, federation={"rounds": 4}), root


def _payload(path: Path) -> dict | None:
    """The torch payload of a checkpoint file (None once an earlier op has made it unreadable)."""
    import torch

    from fedllm.federation import checkpoint as ck

    try:
        payload = torch.load(io.BytesIO(path.read_bytes()[len(ck.MAGIC) + 32:]), weights_only=True)
    except Exception:  # noqa: BLE001  (any damage an earlier op did)
        return None
    return payload if isinstance(payload, dict) else None


def _sealed(payload: dict) -> bytes:
    """A checkpoint file with a valid checksum around any payload (a tampered or foreign file)."""
    import hashlib

    import torch

    from fedllm.federation import checkpoint as ck

    buf = io.BytesIO()
    torch.save(payload, buf)
    return ck.MAGIC + hashlib.sha256(buf.getvalue()).digest() + buf.getvalue()


def _tensor_junk() -> st.SearchStrategy:
    import torch

    return st.sampled_from([torch.zeros(2), torch.full((3, 6), float("nan"), dtype=torch.float64),
                            torch.ones(3, 6, dtype=torch.float32), torch.tensor(1e300, dtype=torch.float64),
                            torch.zeros(0)])


CKPT_FIELDS = ["round", "global_state", "server_state", "client_states", "sampler_state", "rng_states",
               "ledger_state", "metrics_rows", "fingerprint", "format"]
ckpt_op = st.one_of(
    st.tuples(st.just("cut"), st.integers(0, 100_000)),
    st.tuples(st.just("flip"), st.integers(0, 100_000), st.integers(1, 255)),
    st.tuples(st.just("bytes"), st.binary(max_size=64)),
    st.tuples(st.just("field"), st.sampled_from(CKPT_FIELDS), st.one_of(junk, _tensor_junk())),
    st.tuples(st.just("tensor"), st.sampled_from(["lin.weight", "lin.bias", "other"]), _tensor_junk()),
    st.tuples(st.just("row"), st.integers(0, 3), st.sampled_from(ROW_KEYS), row_value),
)


def _spoil(path: Path, op: tuple) -> None:
    kind = op[0]
    blob = path.read_bytes()
    if kind == "cut":
        path.write_bytes(blob[: op[1] % (len(blob) + 1)])
    elif kind == "flip" and blob:
        b = bytearray(blob)
        b[op[1] % len(b)] ^= op[2]
        path.write_bytes(bytes(b))
    elif kind == "bytes":
        path.write_bytes(op[1])
    elif kind != "flip" and (payload := _payload(path)) is not None:
        if kind == "field":
            payload[op[1]] = op[2]
        elif kind == "tensor" and isinstance(payload.get("global_state"), dict):
            payload["global_state"][op[1]] = op[2]
        elif kind == "row" and isinstance(payload.get("metrics_rows"), list) and op[1] < len(payload["metrics_rows"]):
            payload["metrics_rows"][op[1]] = {**payload["metrics_rows"][op[1]], op[2]: op[3]}
        path.write_bytes(_sealed(payload))


@settings(FUZZ, max_examples=80)
@given(ops=st.lists(st.tuples(st.sampled_from([-1, -2]), ckpt_op), min_size=1, max_size=3))
def test_fuzzed_checkpoints_resume_or_give_one_line(stopped_run, tmp_path_factory, ops):
    # Prepare: a copy of the stopped run, its checkpoints damaged or tampered with (valid checksums)
    import shutil

    from fedllm.errors import IntegrityError
    from fedllm.federation.checkpoint import checkpoint_dir, list_checkpoints
    from fedllm.federation.modes import run_federated
    from tests._toy import ToyExperiment

    recipe, pristine = stopped_run
    root = tmp_path_factory.mktemp("resumed")
    shutil.copytree(pristine / "toy", root / "toy")
    ckpts = [p for _, p in list_checkpoints(checkpoint_dir(root / "toy" / "federated"))]
    for which, op in ops:
        _spoil(ckpts[which], op)
    # Execute / Assert: resumed to the end, or one line (a refused checkpoint, an untrusted run)
    try:
        summary = run_federated(ToyExperiment(recipe), out=str(root), resume=True)
    except (RecipeError, IntegrityError) as exc:
        assert "\n" not in str(exc), str(exc)
        event(f"refused: {type(exc).__name__}")
        return
    assert summary["rounds"] == 4
    event("resumed")
