"""The Flower engine: records round-trip bit-exactly, sites are configured as documented, and a real
SuperLink with two SuperNodes on 127.0.0.1 gives the in-process engine's metrics (|Δ| ≤ 1e-5)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from fedllm.algorithms.drift import Correction, Proximal  # noqa: E402
from fedllm.config import dump_recipe, load_recipe  # noqa: E402
from fedllm.federation.flower.codec import (  # noqa: E402
    TrainRequest,
    pack_state,
    records_to_update,
    unpack_state,
    update_to_records,
)
from fedllm.federation.flower.launch import LaunchOptions, child_env, write_app  # noqa: E402
from fedllm.federation.flower.run_config import FlowerRunConfig, NodeSpec, site_recipe  # noqa: E402
from fedllm.types import ClientUpdate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
# two clients, two rounds, few steps, no generation: the smallest run that still aggregates
SMALL = ["partition.num_clients=2", "federation.rounds=2", "train.local_steps=2", "eval.bleu_samples=0",
         "data.max_examples=48", "data.eval_size=8", "output.save_adapter=false"]
# key -> (absolute, relative) tolerance: losses |Δ| ≤ 1e-5; perplexity = exp(loss) relatively; bytes exactly
COMPARED = {"eval_loss": (1e-5, 0), "train_loss": (1e-5, 0), "perplexity": (0, 1e-5), "bytes_up": (0, 0),
            "bytes_down": (0, 0)}


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.lora_A.weight": torch.randn(4, 8, generator=g),
            "a.lora_B.weight": torch.randn(8, 4, generator=g).to(torch.bfloat16),
            "b.bias": torch.tensor([float("nan"), -0.0, 1e-38])}


def test_state_round_trips_bit_exactly_including_bfloat16():
    state = _state()
    record = pack_state(state)
    assert len(record) == 1  # one Flower object per state dict, not one per tensor
    back = unpack_state(record)
    assert list(back) == list(state)  # the sender's key order, not safetensors' sorted one
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k].view(torch.int8), v.view(torch.int8)), k


def test_a_packed_state_from_the_network_is_checked_before_use():
    from flwr.app import Array, ArrayRecord

    with pytest.raises(ValueError, match="one 'safetensors' Array"):
        unpack_state(ArrayRecord({"w": Array(torch.zeros(2).numpy())}))  # one Array per tensor: not ours
    garbage = Array(dtype="uint8", shape=(24,), stype="safetensors", data=b"\xff" * 24)
    with pytest.raises(ValueError, match="packed state is malformed"):
        unpack_state(ArrayRecord({"safetensors": garbage}))
    import safetensors.torch

    blob = safetensors.torch.save({"w": torch.zeros(2)}, metadata={"order": '["w", "x"]'})
    with pytest.raises(ValueError, match="key order"):
        unpack_state(ArrayRecord({"safetensors": Array(dtype="uint8", shape=(len(blob),), stype="safetensors",
                                                        data=blob)}))


def test_train_request_and_client_update_round_trip():
    state = _state()
    req = TrainRequest(round=3, client_id=1, start=state, steps=5,
                       drift=Correction({k: v * 0 for k, v in state.items()}))
    back = TrainRequest.from_records(req.to_records())
    assert (back.round, back.client_id, back.steps) == (3, 1, 5)
    assert isinstance(back.drift, Correction) and set(back.drift.tensors) == set(state)
    # a proximal term travels as its μ; its anchor is the start state unless another is sent
    prox = TrainRequest.from_records(TrainRequest(3, 1, state, 5, drift=Proximal(0.25, state)).to_records())
    assert isinstance(prox.drift, Proximal) and prox.drift.mu == 0.25 and prox.drift.anchor is prox.start
    other = {k: v + 1 for k, v in state.items()}
    moved = TrainRequest.from_records(TrainRequest(3, 1, state, 5, drift=Proximal(0.5, other)).to_records())
    assert all(torch.equal(moved.drift.anchor[k].view(torch.uint8), other[k].view(torch.uint8)) for k in other)
    assert TrainRequest.from_records(TrainRequest(3, 1, state, 5).to_records()).drift is None
    upd = ClientUpdate(client_id=1, delta=state, num_examples=7, local_steps=5, train_loss=2.5, bytes_up=99,
                       metrics={"accuracy": 0.5})
    got = records_to_update(update_to_records(upd))
    assert got.grad_steps is None
    assert records_to_update(update_to_records(dataclasses.replace(upd, grad_steps=4))).grad_steps == 4
    assert (got.client_id, got.num_examples, got.local_steps, got.train_loss, got.bytes_up) == (1, 7, 5, 2.5, 99)
    assert dict(got.metrics) == {"accuracy": 0.5} and torch.equal(got.delta["a.lora_A.weight"], state["a.lora_A.weight"])


def test_a_reply_without_fedllm_records_is_rejected_with_the_expected_shape():
    from flwr.app import RecordDict

    with pytest.raises(ValueError, match="lacks the 'delta' record"):
        records_to_update(RecordDict())
    with pytest.raises(ValueError, match="lacks the 'state' record"):
        TrainRequest.from_records(RecordDict())


def test_node_config_is_checked_against_the_recipe():
    with pytest.raises(ValueError, match="lacks partition-id"):
        NodeSpec.from_node_config({"num-partitions": 2})
    with pytest.raises(ValueError, match="partition-id"):
        NodeSpec.from_node_config({"partition-id": -1})
    text = dump_recipe(load_recipe(TINY, SMALL))
    with pytest.raises(ValueError, match=r"expected in \[0, 2\)"):
        site_recipe(text, NodeSpec(partition_id=2))
    with pytest.raises(ValueError, match="num-partitions=3"):
        site_recipe(text, NodeSpec(partition_id=0, num_partitions=3))


def test_a_site_with_its_own_file_reads_it_whole(tmp_path):
    rows = tmp_path / "site.jsonl"
    rows.write_text("".join(f'{{"prompt": "q{i}", "response": "a{i}"}}\n' for i in range(5)))
    text = dump_recipe(load_recipe(TINY, SMALL))
    r = site_recipe(text, NodeSpec(partition_id=1, data_path=str(rows)))
    assert (r.data.path, r.data.builtin, r.data.max_examples) == (str(rows), None, None)
    assert (r.partition.num_clients, r.partition.method, r.partition.column) == (1, "iid", None)
    assert r.federation == load_recipe(TINY, SMALL).federation  # everything else is the server's


def test_flower_processes_get_telemetry_off_and_a_private_home(tmp_path):
    env = child_env(tmp_path, LaunchOptions())
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["FLWR_HOME"] == str(tmp_path)
    cfg = FlowerRunConfig("name: x\n", str(tmp_path), 60.0)
    text = (write_app(tmp_path / "app", cfg) / "pyproject.toml").read_text()
    assert 'serverapp = "fedllm.federation.flower.apps:server_app"' in text
    assert FlowerRunConfig.from_user_config(cfg.to_user_config()) == cfg


class _LoopbackGrid:
    """A Grid whose nodes are in-test sites: messages cross the real wire format (records), and
    each site trains with :func:`site_train` on its own experiment (a separate ToyExperiment)."""

    def __init__(self, site_exp, state_dir: Path | None = None) -> None:
        from fedllm.federation.flower.site import SiteUplink, needs_site_uplink

        self.site_exp, self.pending, self.next_id = site_exp, {}, 0
        n = site_exp.recipe.partition.num_clients
        self.uplinks = ({k: SiteUplink(site_exp.recipe, site_exp, k, state_dir, "wire") for k in range(n)}
                        if needs_site_uplink(site_exp.recipe) else {})

    def get_node_ids(self):
        return [100 + k for k in range(self.site_exp.recipe.partition.num_clients)]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.next_id += 1
            self.pending[str(self.next_id)] = msg
            ids.append(str(self.next_id))
        return ids

    def pull_messages(self, ids):
        from types import SimpleNamespace

        from fedllm.federation.flower.site import site_train

        replies = []
        for i in list(ids):
            msg = self.pending.pop(i)
            k = msg.metadata.dst_node_id - 100
            content = site_train(self.site_exp, k, self.site_exp.data.client_examples(k), msg.content,
                                 self.uplinks.get(k))
            replies.append(SimpleNamespace(content=content, has_error=lambda: False,
                                           metadata=SimpleNamespace(reply_to_message_id=i, src_node_id=100 + k)))
        return replies


@pytest.fixture
def task_identity(monkeypatch):
    """Flower builds Messages only inside a task; give this test process a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.mark.parametrize("groups", [
    {"federation": {"algorithm": "fedprox", "mu": 0.5}},
    {"federation": {"algorithm": "scaffold"}},
    # local_steps back at its default: the toy recipe sets 3, and local_epochs is exclusive with it
    {"federation": {"algorithm": "fednova"}, "train": {"local_epochs": 1, "local_steps": 10}},
    {"server": {"optimizer": "fedadam", "lr": 0.1}, "robust": {"aggregator": "trimmed_mean", "trim_ratio": 0.25}},
    {"privacy": {"dp": "server", "clip": 0.5, "noise_multiplier": 0.3}, "compression": {"codec": "q8"},
     "federation": {"weighted": False}},
    {"federation": {"fraction": 0.5}, "faults": {"error_clients": [1], "rounds": [2]}},
    {"compression": {"codec": "topk", "topk_fraction": 0.3, "error_feedback": True}, "federation": {"fraction": 0.5}},
], ids=["fedprox", "scaffold", "fednova-epochs", "fedadam-trimmed", "dp-q8", "sampling-failure", "topk-feedback"])
def test_the_flower_wire_gives_the_inprocess_engine_exactly(groups, tmp_path, task_identity):
    """Prepare one toy recipe; Execute run_federated in-process and through RemoteExperiment over the
    records (sites on their own experiments); Assert identical rows and final state."""
    import json

    from fedllm.federation.flower.coordinator import RemoteExperiment, Site
    from fedllm.federation.modes import run_federated
    from fedllm.federation.rundir import read_metrics, run_dir
    from tests._toy import ToyExperiment, toy_recipe

    groups = {**groups, "federation": {"rounds": 3, **groups.get("federation", {})}}
    recipe = toy_recipe(name="wire", partition={"method": "iid", "num_clients": 4}, **groups)
    local, server_side = ToyExperiment(recipe), ToyExperiment(recipe)
    sites = {k: Site(100 + k, len(server_side.data.client_examples(k)), False) for k in range(4)}
    remote = RemoteExperiment(server_side, _LoopbackGrid(ToyExperiment(recipe), tmp_path / "site-state"), sites,
                              timeout_s=5)

    run_federated(local, str(tmp_path / "a"))
    run_federated(remote, str(tmp_path / "b"))

    ref, got = read_metrics(run_dir(recipe, "federated", str(tmp_path / "a"))), \
        read_metrics(run_dir(recipe, "federated", str(tmp_path / "b")))
    drop = ("round_time_s", "train_time_s", "aggregate_time_s", "eval_time_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == \
        [{k: v for k, v in r.items() if k not in drop} for r in ref]
    assert all(torch.equal(local.saved[k], server_side.saved[k]) for k in local.saved)
    assert json.dumps(ref[-1]["clients"]) == json.dumps(got[-1]["clients"])


def _corpus(path: Path, n: int = 40) -> Path:
    """A small instruction file with a topic column (two topics: one natural client each)."""
    import json

    topics = ("sleep", "stress")
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"prompt": f"What helps with {topics[i % 2]} case {i}?",
                                 "response": f"Routine {i}, rest and talking to someone about {topics[i % 2]}.",
                                 "topic": topics[i % 2]}) + "\n")
    return path


def _assert_same_rounds(ref: list[dict], got: list[dict]) -> None:
    assert [r["round"] for r in got] == [r["round"] for r in ref] == [0, 1, 2]
    for a, b in zip(ref, got):
        assert a["clients"] == b["clients"] and a.get("aggregated_clients") == b.get("aggregated_clients")
        for key, (abs_tol, rel_tol) in COMPARED.items():
            if a[key] is None:
                assert b[key] is None, (a["round"], key)
            else:
                assert math.isclose(a[key], b[key], rel_tol=rel_tol, abs_tol=abs_tol), (a["round"], key, a[key], b[key])
    assert got[-1]["eval_loss"] < got[0]["eval_loss"]  # the rounds did train


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process run both Flower runtimes are compared with: (overrides, corpus, run directory)."""
    from fedllm.experiments import make_experiment
    from fedllm.federation.modes import run_federated
    from fedllm.federation.rundir import run_dir

    root = tmp_path_factory.mktemp("flower")
    corpus = _corpus(root / "corpus.jsonl")
    overrides = [*SMALL, "data.builtin=null", f"data.path={corpus}", "data.max_examples=null",
                 "partition.column=topic"]
    recipe = load_recipe(TINY, overrides)
    run_federated(make_experiment(recipe), str(root / "inprocess"))
    return overrides, corpus, run_dir(recipe, "federated", str(root / "inprocess"))


@pytest.mark.slow
def test_real_superlink_and_two_supernodes_with_their_own_data_match_the_inprocess_engine(reference, tmp_path):
    """Prepare each site's own file (its in-process training rows, in order); Execute on a loopback
    SuperLink with two SuperNodes; Assert the in-process metrics every round."""
    import json

    from fedllm.federation.flower.launch import run_deployment
    from fedllm.federation.rundir import read_metrics, run_dir

    overrides, corpus, ref_dir = reference
    recipe = load_recipe(TINY, overrides)
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    split = json.loads((ref_dir / "partition.json").read_text())["clients"]
    sites = []
    for k in range(2):
        site = tmp_path / f"site{k}.jsonl"
        site.write_text("".join(json.dumps(rows[i]) + "\n" for i in split[str(k)]))
        sites.append(str(site))

    summary = run_deployment(recipe, str(tmp_path / "flower"),
                             LaunchOptions(timeout_s=240, log_dir=str(tmp_path / "logs")), data_paths=sites)

    got_dir = run_dir(recipe, "federated", str(tmp_path / "flower"))
    ref_rows, got_rows = read_metrics(ref_dir), read_metrics(got_dir)
    _assert_same_rounds(ref_rows, got_rows)
    for a, b in zip(ref_rows, got_rows):  # the deployment (executor path) is bit-identical, not only close
        assert [a[k] for k in COMPARED] == [b[k] for k in COMPARED], a["round"]
    assert summary["rounds"] == 2
    part = json.loads((got_dir / "partition.json").read_text())
    assert part["clients"]["0"]["num_examples"] == len(split["0"])  # the server saw sizes, never rows


@pytest.mark.slow
def test_cli_engine_flower_runs_the_simulation_runtime_with_the_same_metrics(reference, tmp_path):
    """Prepare the reference recipe; Execute `fedllm run ... --engine flower`; Assert in-process metrics."""
    pytest.importorskip("ray")
    from fedllm.cli import main
    from fedllm.federation.rundir import read_metrics, run_dir

    overrides, _, ref_dir = reference

    assert main(["run", str(TINY), *overrides, "--engine", "flower", "--out", str(tmp_path)]) == 0

    got_dir = run_dir(load_recipe(TINY, overrides), "federated", str(tmp_path))
    _assert_same_rounds(read_metrics(ref_dir), read_metrics(got_dir))
    assert (got_dir / "report.md").exists() and (got_dir / "summary.json").exists()


def test_an_oversized_reply_is_refused_before_it_is_decoded():
    from fedllm.federation.flower.codec import check_reply_size

    upd = ClientUpdate(client_id=1, delta=_state(), num_examples=7, local_steps=5, train_loss=2.5)
    content = update_to_records(upd)
    check_reply_size(content, limit=10_000)  # a normal reply passes
    big = update_to_records(dataclasses.replace(upd, delta={"a": torch.zeros(100_000)}))
    with pytest.raises(ValueError, match=r"holds 400,\d{3} bytes of arrays, more than the 10,000"):
        check_reply_size(big, limit=10_000)
