"""The deployment attack of issue 15, repeated on 127.0.0.1 against fedllm's SuperLink and SuperNode.

The attack: a stranger holding only the CA certificate (docs/deploy.md hands it to every site)
registers their own SuperNode key and submits their own app; with a bare ``flower-superlink``
bound to a public address its server part runs on the coordinator and its client part on every
site. fedllm's SuperLink (``python -m fedllm.federation.flower superlink``, started exactly as the
guide says, with 127.0.0.1 and free ports in place of the guide's addresses) serves only the Fleet
API on the public port and refuses non-fedllm apps on its loopback Control port; fedllm's
SuperNode answers a non-fedllm app with Flower's verification error and runs none of its code.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from fedllm.federation.flower.gate import fab_problem, fleet_only, is_loopback  # noqa: E402
from fedllm.federation.flower.launch import (  # noqa: E402
    CONNECTION,
    Children,
    LaunchOptions,
    child_env,
    exe,
    free_port,
    make_certificates,
    make_node_key,
    port_open,
    start_superlink,
    write_app,
)
from fedllm.federation.flower.run_config import FlowerRunConfig  # noqa: E402

EVIL_SOURCE = '''
import json, time
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

MARKS = {marks!r}
server_app = ServerApp()
client_app = ClientApp()

@server_app.main()
def main(grid, context):
    open(MARKS + "/server-ran", "w").write("the stranger's server code ran")
    nodes = []
    for _ in range(300):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        time.sleep(0.1)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=120))
    out = [{{"error": r.has_error(), "reason": r.error.reason if r.has_error() else None}} for r in replies]
    open(MARKS + "/replies.json", "w").write(json.dumps({{"nodes": len(nodes), "replies": out}}))

@client_app.train()
def train(msg, context):
    open(MARKS + "/client-ran", "w").write(json.dumps(dict(context.node_config)))
    return Message(RecordDict(), reply_to=msg)
'''


def _evil_app(folder: Path, marks: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil.py").write_text(EVIL_SOURCE.format(marks=str(marks)))
    (folder / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "evil"\nversion = "1.0.0"\ndescription = "x"\nlicense = "MIT"\ndependencies = []\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n'
        '[tool.flwr.app]\npublisher = "evil"\n'
        '[tool.flwr.app.components]\nserverapp = "evil:server_app"\nclientapp = "evil:client_app"\n'
        '[tool.flwr.app.config]\n')
    return folder


def _fab(app_dir: Path) -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def _connection(home: Path, port: int, ca: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n')
    return home


def _flwr(env: dict, home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([exe("flwr"), *args], env={**env, "FLWR_HOME": str(home)}, capture_output=True,
                          text=True, timeout=timeout)


def _fedllm_app(tmp: Path) -> Path:
    return write_app(tmp / "fedllm-app", FlowerRunConfig("model: {}\n", str(tmp / "runs")))


# --- the checks themselves ------------------------------------------------------------------------

def test_only_a_fedllm_app_bundle_passes_the_pin(tmp_path):
    assert fab_problem(_fab(_fedllm_app(tmp_path))) is None
    assert "files besides pyproject.toml" in fab_problem(_fab(_evil_app(tmp_path / "evil", tmp_path)))
    assert "not a readable app bundle" in fab_problem(b"PK\x03\x04 garbage")
    assert "not a readable app bundle" in fab_problem(b"")

    def variant(edit) -> str | None:
        folder = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        app = _fedllm_app(folder)
        text = (app / "pyproject.toml").read_text()
        (app / "pyproject.toml").write_text(edit(text))
        return fab_problem(_fab(app))

    assert "components" in variant(lambda t: t.replace("apps:client_app", "apps:server_app"))
    assert "dependencies" in variant(lambda t: t.replace("dependencies = []", 'dependencies = ["evil==1"]'))
    assert "run config has keys" in variant(lambda t: t + '\n[tool.flwr.app.config.extra]\nx = 1\n')


def test_the_public_listener_serves_the_fleet_api_and_health_only():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    public = fleet_only(app)

    def status(path: str) -> int:
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        asyncio.run(public({"type": "http", "path": path, "method": "POST"}, receive, send))
        return sent[0]["status"]

    assert status("/v1/fleet/pull-messages") == 200 and status("/health") == 200
    for path in ("/v1/control/start-run", "/v1/control/register-node", "/v1/runtime/pull-task-input",
                 "/docs", "/openapi.json", "/v1/fleetx", "/"):
        assert status(path) == 404, path
    assert seen == ["/v1/fleet/pull-messages", "/health"]
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1")


def test_the_entry_points_refuse_an_exposed_control_api_and_clear_text(tmp_path):
    env = {**child_env(tmp_path / "home", LaunchOptions()), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "fedllm.federation.flower"]
    certs = make_certificates(tmp_path / "certs")
    tls = ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
           "--ssl-keyfile", str(certs / "server.key")]
    cases = {
        "--host 0.0.0.0 (Control API exposed)":
            [*cmd, "superlink", "--public", "127.0.0.1:1", *tls, "--enable-supernode-auth", "--host", "0.0.0.0"],
        "no node authentication": [*cmd, "superlink", "--public", "127.0.0.1:1", *tls],
        "insecure link": [*cmd, "superlink", "--public", "127.0.0.1:1", "--insecure"],
        "insecure node": [*cmd, "supernode", "--insecure", "--superlink", "127.0.0.1:1"],
        "node without key": [*cmd, "supernode", "--superlink", "127.0.0.1:1", "--root-certificates",
                             str(certs / "ca.crt")],
        "process isolation without an executor secret":
            [*cmd, "supernode", "--superlink", "127.0.0.1:1", "--root-certificates", str(certs / "ca.crt"),
             "--auth-supernode-private-key", str(tmp_path / "none.key"), "--isolation", "process"],
    }
    for what, args in cases.items():
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, what
        assert "fedllm" in done.stderr and "Traceback" not in done.stderr, (what, done.stderr[-800:])


# --- the attack on 127.0.0.1 ----------------------------------------------------------------------

@pytest.mark.slow
def test_a_stranger_with_the_ca_certificate_can_neither_register_nor_run_code(tmp_path):
    """The attack of issue 15 against fedllm's SuperLink: TLS, node authentication, the guide's flags."""
    marks = tmp_path / "marks"
    marks.mkdir()
    evil = _evil_app(tmp_path / "evil", marks)
    certs = make_certificates(tmp_path / "certs")
    operator_home = tmp_path / "operator"
    env = child_env(operator_home, LaunchOptions())
    with Children(tmp_path / "logs", env, tmp_path) as kids:
        public = start_superlink(kids, operator_home, certs, time.monotonic() + 180)
        stranger = _connection(tmp_path / "stranger", public, certs / "ca.crt")
        key = make_node_key(tmp_path / "keys" / "stranger")

        register = _flwr(env, stranger, "supernode", "register", str(key) + ".pub", CONNECTION)
        run = _flwr(env, stranger, "run", str(evil), CONNECTION, "--stream")
        # the operator's own Control port (loopback) refuses the stranger's app too
        pinned = _flwr(env, operator_home, "run", str(evil), CONNECTION, "--stream")
        listed = _flwr(env, operator_home, "supernode", "list", CONNECTION)
        ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        statuses = {}
        for path in ("/v1/control/list-runs", "/v1/runtime/pull-task-input", "/docs", "/health"):
            try:
                with urllib.request.urlopen(urllib.request.Request(f"https://127.0.0.1:{public}{path}",
                                                                   data=b"", method="POST"), context=ctx) as r:
                    statuses[path] = r.status
            except urllib.error.HTTPError as e:
                statuses[path] = e.code
        time.sleep(2)  # any ServerApp the link had started would have written its mark by now
        link_log = kids.tail("superlink", 20000)

    assert register.returncode != 0, register.stdout
    assert run.returncode != 0, run.stdout
    assert pinned.returncode != 0 and "runs only fedllm's apps" in (pinned.stdout + pinned.stderr), pinned.stdout
    assert "stranger" not in listed.stdout and listed.returncode == 0
    assert statuses["/v1/control/list-runs"] == 404 and statuses["/v1/runtime/pull-task-input"] == 404
    assert statuses["/docs"] == 404
    assert not (marks / "server-ran").exists() and not (marks / "client-ran").exists()
    assert "register-node HTTP/1.1\" 200" not in link_log and "Created run" not in link_log


@pytest.mark.slow
def test_a_fedllm_supernode_answers_a_foreign_app_with_an_error_and_runs_none_of_it(tmp_path):
    """Even through a SuperLink that lets the app in (a bare flower-superlink), the site runs none of it."""
    marks = tmp_path / "marks"
    marks.mkdir()
    evil = _evil_app(tmp_path / "evil", marks)
    home = tmp_path / "home"
    home.mkdir()
    env = child_env(home, LaunchOptions())
    port = free_port()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    with Children(tmp_path / "logs", env, tmp_path) as kids:
        kids.start("superlink", [exe("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
                                 "--disable-runtime-dependency-installation"])
        kids.wait_until(lambda: port_open(port), "the bare SuperLink", time.monotonic() + 120, ["superlink"])
        kids.start("site", [sys.executable, "-m", "fedllm.federation.flower", "supernode", "--allow-insecure",
                            "--insecure", "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1",
                            "--port", str(free_port()), "--node-config", 'partition-id=0 data-path="/secret.jsonl"'])
        run = subprocess.run([exe("flwr"), "run", str(evil), CONNECTION, "--stream"], env=env,
                             capture_output=True, text=True, timeout=240)
        site_log = kids.tail("site", 20000)

    assert (marks / "server-ran").exists(), run.stdout  # the bare link did run the stranger's server part
    replies = json.loads((marks / "replies.json").read_text())
    assert replies["nodes"] == 1 and len(replies["replies"]) == 1
    assert replies["replies"][0]["error"] and "could not be verified" in replies["replies"][0]["reason"]
    assert not (marks / "client-ran").exists(), "the site ran the stranger's ClientApp"
    assert "its app is not fedllm's" in site_log


def test_the_supernode_loop_waits_at_most_a_tenth_of_a_second():
    """Flower 1.41 sleeps a fixed 3 s after an empty pull and 0.5 s per reply check; fedllm's
    SuperNode caps both (the source check fails loudly if a Flower upgrade moves them)."""
    import inspect

    from flwr.supernode import start_client_internal as sci

    from fedllm.federation.flower.gate import SUPERNODE_POLL_S, quicken_supernode_loop

    source = inspect.getsource(sci)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source
    quicken_supernode_loop()
    t0 = time.perf_counter()
    sci.time.sleep(3)
    assert time.perf_counter() - t0 < SUPERNODE_POLL_S + 0.2
    assert sci.time.monotonic() > 0 and sci.time.time() > 0  # the rest is the time module's


def test_the_executor_refuses_clear_text_off_loopback_and_an_empty_secret(tmp_path):
    """fedllm's executor takes a site's tasks only with the SuperNode's shared secret, and speaks
    clear text only on loopback."""
    from fedllm.federation.flower.executor import options_from_args

    secret = tmp_path / "site.superexec"
    secret.write_bytes(b"")
    with pytest.raises(SystemExit, match="empty"):
        options_from_args("127.0.0.1:9094", str(secret), insecure=True, root_certificates=None)
    secret.write_bytes(b"s" * 32)
    with pytest.raises(SystemExit, match="clear text"):
        options_from_args("10.0.0.5:9094", str(secret), insecure=True, root_certificates=None)
    with pytest.raises(SystemExit, match="exactly one"):
        options_from_args("127.0.0.1:9094", str(secret), insecure=False, root_certificates=None)
    opts = options_from_args("127.0.0.1:9094", str(secret), insecure=True, root_certificates=None)
    assert opts.secret == b"s" * 32 and opts.insecure


def test_object_pulls_retry_within_a_fraction_of_a_second():
    """Flower 1.41 waits 1 s (doubling to 10 s) before re-asking for an object that is announced but
    not yet stored; fedllm's processes re-ask after 0.02 s, doubling to 0.25 s."""
    from flwr.supercore.inflatable import inflatable_utils as iu

    from fedllm.federation.flower.gate import PULL_RETRY_S, quicken_object_pulls

    quicken_object_pulls()
    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        assert (fn.__kwdefaults__["initial_backoff"], fn.__kwdefaults__["backoff_cap"]) == PULL_RETRY_S
    calls = []

    def pull(object_id):
        calls.append(time.perf_counter())
        if len(calls) < 3:
            raise iu.ObjectUnavailableError(object_id)
        return b"content"

    t0 = time.perf_counter()
    assert iu.pull_objects(["a"], pull) == {"a": b"content"}
    assert len(calls) == 3 and time.perf_counter() - t0 < 0.5  # Flower's defaults: about 3 s
