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
        "an abbreviated --isolation without an executor secret":
            [*cmd, "supernode", "--superlink", "127.0.0.1:1", "--root-certificates", str(certs / "ca.crt"),
             "--auth-supernode-private-key", str(tmp_path / "none.key"), "--isol", "process"],
        "subprocess isolation (Flower's default): an unauthenticated Runtime API":
            [*cmd, "supernode", "--superlink", "127.0.0.1:1", "--root-certificates", str(certs / "ca.crt"),
             "--auth-supernode-private-key", str(tmp_path / "none.key")],
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


# --- issue 32: flags as Flower reads them, environment switches, the public listener's caps ------

def _node_args(tmp_path, *extra: str) -> list[str]:
    return ["--superlink=127.0.0.1:1", f"--root-certificates={tmp_path / 'ca.crt'}",
            f"--auth-supernode-private-key={tmp_path / 'site.key'}", *extra]


def test_supernode_flags_are_checked_as_flowers_parser_reads_them(tmp_path):
    """`=` forms pass, an abbreviation means what Flower takes it to mean, and Flower's default
    isolation (subprocess: a Runtime API with no authentication) is refused outside loopback tests."""
    from fedllm.federation.flower.flags import parse_flower, supernode_problem
    from fedllm.federation.flower.worker import write_secret

    secret = tmp_path / "site.superexec"
    write_secret(secret)

    def problem(*args: str, ok: bool = False) -> str | None:
        return supernode_problem(parse_flower("supernode", _node_args(tmp_path, *args)), ok)

    assert problem("--isolation=process", f"--superexec-auth-secret-file={secret}") is None
    assert problem("--isol", "process", "--superexec-auth", str(secret)) is None  # abbreviations, as Flower reads them
    assert "expected --superexec-auth-secret-file" in problem("--isol", "process")
    assert "Flower's default" in problem()  # no --isolation at all: subprocess
    assert "Flower's default" in problem("--isolation=subprocess")
    assert problem(ok=True) is None  # --allow-insecure: loopback tests and benchmarks only
    assert "expected a loopback address" in problem("--isolation=process", f"--superexec-auth-secret-file={secret}",
                                                    "--host=0.0.0.0")
    secret.chmod(0o644)
    assert "lets other users read it" in problem("--isolation=process", f"--superexec-auth-secret-file={secret}")
    assert "no such file" in problem("--isolation=process", f"--superexec-auth-secret-file={tmp_path}/x").lower()
    assert "expected --auth-supernode-private-key" in supernode_problem(
        parse_flower("supernode", ["--root-certificates=ca.crt", "--isolation=process"]), False)


def test_the_launcher_starts_subprocess_isolation_only_when_told_it_is_insecure():
    with pytest.raises(ValueError, match="any local process"):
        LaunchOptions(isolation="subprocess")
    assert LaunchOptions(isolation="subprocess", allow_insecure=True).allow_insecure
    assert LaunchOptions().isolation == "process"


def test_superlink_flags_and_environment_are_checked_as_flower_reads_them():
    from fedllm.federation.flower.flags import env_problem, parse_flower, superlink_problem

    tls = ["--ssl-ca-certfile=ca.crt", "--ssl-certfile=s.pem", "--ssl-keyfile=s.key"]

    def problem(*args: str) -> str | None:
        return superlink_problem(parse_flower("superlink", [*tls, *args]), False)

    assert problem("--enable-supernode-auth", "--host=127.0.0.1") is None
    assert problem("--enable-supernode", "--ho=127.0.0.1", "--po=9093") is None  # abbreviations
    assert "--host 0.0.0.0" in problem("--enable-supernode-auth", "--ho=0.0.0.0")
    assert "expected --enable-supernode-auth" in problem()
    assert "without TLS" in problem("--enable-supernode-auth", "--health-server-address=0.0.0.0:8081")
    assert env_problem({"PATH": "/bin"}) is None
    for name in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        assert name in env_problem({name: "1"}) and "unset it" in env_problem({name: "1"})


def test_an_environment_switch_that_opens_control_stops_the_superlink(tmp_path):
    """Issue 32, break 6: with FLWR_INTERNAL_GRPC_CONTROL_API=1 Flower serves an unauthenticated gRPC
    Control API on 0.0.0.0:9093; fedllm's SuperLink refuses to start and names the variable."""
    certs = make_certificates(tmp_path / "certs")
    env = {**child_env(tmp_path / "home", LaunchOptions()), "FLWR_INTERNAL_GRPC_CONTROL_API": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    control, public = free_port(), free_port()
    done = subprocess.run(
        [sys.executable, "-m", "fedllm.federation.flower", "superlink", "--public", f"127.0.0.1:{public}",
         f"--ssl-ca-certfile={certs / 'ca.crt'}", f"--ssl-certfile={certs / 'server.pem'}",
         f"--ssl-keyfile={certs / 'server.key'}", "--enable-supernode-auth", "--host=127.0.0.1", f"--port={control}"],
        env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "FLWR_INTERNAL_GRPC_CONTROL_API" in done.stderr, done.stderr[-800:]
    assert "Traceback" not in done.stderr and not port_open(control) and not port_open(public)


def _asgi(app, path: str = "/v1/fleet/push-object", headers=(), chunks=(b"",), client="10.0.0.9") -> tuple[int, bool]:
    """(status, whether the app ran) for one request through ``app``; ``chunks`` is the body as sent."""
    sent, body = [], list(chunks)

    async def receive():
        if body:
            data = body.pop(0)
            return {"type": "http.request", "body": data, "more_body": bool(body)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": "POST", "client": (client, 5555),
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"]).get(b"connection") == b"close"


def test_the_public_listener_caps_size_rate_and_signature_age_before_the_app_reads():
    from fedllm.federation.flower.limits import MIB, PublicLimits, guarded

    ran = []

    async def app(scope, receive, send):  # reads the whole body, as Flower's middleware does (Starlette's request.body)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("the client went away")  # Starlette's ClientDisconnect
            if not message.get("more_body"):
                break
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limits = PublicLimits(max_request_bytes=6 * MIB, rate_per_s=5.0, max_signature_age_s=3.0)
    public = guarded(app, limits)
    assert _asgi(public, chunks=[b"x" * 1000]) == (200, False)
    assert _asgi(public, headers=[("content-length", str(400 * MIB))]) == (413, True)  # nothing read
    assert _asgi(public, chunks=[b"x" * MIB] * 7) == (413, True)  # streamed: cut at the cap
    assert _asgi(public, headers=[("content-length", "1"), ("content-length", "2")])[0] == 400
    assert len(ran) == 1
    statuses = [_asgi(public, client="10.0.0.7")[0] for _ in range(40)]  # burst 4 x rate, then 503 (Flower retries it)
    assert statuses[:20] == [200] * 20 and 503 in statuses and _asgi(public, client="10.0.0.8")[0] == 200

    async def registered(key: bytes) -> bool:
        return True

    authed = guarded(app, limits, registered)
    assert _asgi(authed, chunks=[b"x"])[0] == 401  # unsigned: refused before the body
    assert _asgi(authed, path="/health")[0] == 200


def test_a_slow_body_is_cut_and_addresses_are_counted_per_host():
    from fedllm.federation.flower.limits import PublicLimits, TokenBuckets, client_key, guarded

    async def app(scope, receive, send):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("the client went away")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []

    async def slow_receive():
        await asyncio.sleep(5)
        return {"type": "http.request", "body": b"x", "more_body": False}

    async def send(message):
        sent.append(message)

    public = guarded(app, PublicLimits(body_timeout_s=0.2))
    t0 = time.perf_counter()
    asyncio.run(public({"type": "http", "path": "/v1/fleet/x", "client": ("10.0.0.1", 1), "headers": []},
                       slow_receive, send))
    assert sent[0]["status"] == 408 and time.perf_counter() - t0 < 2
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff") == "2001:db8::/64"  # one host holds a /64
    assert client_key("::ffff:10.0.0.1") == client_key("10.0.0.1") == "10.0.0.1"
    buckets, now = TokenBuckets(rate=1.0, burst=2.0, clock=lambda: 0.0), 0
    for k in range(3 * TokenBuckets.MAX_CLIENTS):  # many addresses: the table stays bounded
        buckets.take(f"10.{k >> 16}.{(k >> 8) & 255}.{k & 255}")
        now = max(now, len(buckets.buckets))
    assert now <= TokenBuckets.MAX_CLIENTS


# --- issue 32 on 127.0.0.1: one SuperLink started as docs/deploy.md says, attacked three ways ----

SIGNATURE_AGE_S = 3.0  # the test SuperLink's --max-signature-age-s (default 10 s), short to keep the test short
RSS_BOUND_MIB = 200  # the SuperLink's RSS may grow at most this much under the floods below (measured: docs/deploy.md)


@pytest.fixture(scope="module")
def link(tmp_path_factory):
    """fedllm's SuperLink (TLS, node authentication, default caps) and one registered site key."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    tmp = tmp_path_factory.mktemp("link")
    certs = make_certificates(tmp / "certs")
    home = tmp / "operator"
    env = child_env(home, LaunchOptions())
    with Children(tmp / "logs", env, tmp) as kids:
        public = start_superlink(kids, home, certs, time.monotonic() + 180,
                                 ("--max-signature-age-s", str(SIGNATURE_AGE_S)))
        key_path = make_node_key(tmp / "keys" / "site0")
        registered = _flwr(env, home, "supernode", "register", str(key_path) + ".pub", CONNECTION)
        assert registered.returncode == 0, registered.stdout + registered.stderr
        key = load_ssh_private_key(key_path.read_bytes(), None)
        yield {"kids": kids, "env": env, "home": home, "tmp": tmp, "certs": certs, "public": public,
               "key": key, "key_path": key_path}


def _signed(key, stamp: str | None = None) -> dict[str, str]:
    """The node-auth headers Flower's SuperNode sends: its public key and a signature over a timestamp."""
    import datetime
    from base64 import b64encode

    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, sign_message

    stamp = stamp or datetime.datetime.now(tz=datetime.UTC).isoformat()
    return {"flwr-public-key": b64encode(public_key_to_bytes(key.public_key())).decode(), "flwr-timestamp": stamp,
            "flwr-signature": b64encode(sign_message(key, stamp.encode("ascii"))).decode()}


def _flood(port: int, ca: Path, headers: dict[str, str], chunked: bool, most_mib: int = 96,
           seconds: float = 20.0) -> tuple[int | None, int, bool]:
    """POST a body to the public port 1 MiB at a time (at most ``most_mib``, at most ``seconds``) until the
    server closes; return (status or None, MiB sent, whether the server closed the connection)."""
    import socket

    ctx = ssl.create_default_context(cafile=str(ca))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    length = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {400 * 1024 * 1024}\r\n"
    block, sent, closed, data = b"\0" * (1 << 20), 0, False, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(f"POST /v1/fleet/push-object HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}{length}"
                  "Content-Type: application/protobuf\r\n\r\n".encode())
        t0 = time.monotonic()
        try:
            while sent < most_mib and time.monotonic() - t0 < seconds:
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                sent += 1
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            closed = True
        try:
            while chunk := s.recv(65536):
                data += chunk
            closed = True  # end of stream: the server closed it
        except (ConnectionResetError, ssl.SSLError):
            closed = True
        except TimeoutError:
            pass
    status = int(data.split()[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, sent, closed


@pytest.mark.slow
def test_bodies_over_the_cap_are_cut_and_the_superlink_memory_stays_bounded(link):
    """Issue 32, break 2: three 400 MiB POSTs from a stranger raised a SuperLink from 1.0 to 3.4 GB.
    Now: a declared 400 MiB is a 413 before any byte is read, an unsigned streamed body a 401 before
    any byte is read, and a registered site's streamed body is cut at the 32 MiB cap; the connection is
    closed every time and the process's RSS grows by less than RSS_BOUND_MIB."""
    import threading

    import psutil

    proc = psutil.Process(link["kids"].procs["superlink"].pid)
    before, peak, stop = proc.memory_info().rss, [0], threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    results = []
    try:
        for _ in range(3):
            results.append(("declared 400 MiB, stranger", _flood(link["public"], link["certs"] / "ca.crt", {}, False)))
            results.append(("streamed, stranger", _flood(link["public"], link["certs"] / "ca.crt", {}, True)))
            results.append(("streamed, registered key",
                            _flood(link["public"], link["certs"] / "ca.crt", _signed(link["key"]), True)))
    finally:
        stop.set()
        sampler.join()
    grown = (max(peak[0], proc.memory_info().rss) - before) / 2**20
    print(f"SuperLink RSS {before / 2**20:.0f} MiB before, peak +{grown:.0f} MiB; " +
          "; ".join(f"{what}: {r}" for what, r in results))
    for what, (status, sent, closed) in results:
        assert closed and status in (None, 401, 413), (what, status, sent)
        assert sent < 96, (what, sent)  # the server stopped taking bytes long before the client stopped sending
    assert [r[1][0] for r in results if r[0] == "streamed, registered key"].count(200) == 0
    assert grown < RSS_BOUND_MIB, f"SuperLink RSS grew by {grown:.0f} MiB"
    ctx = ssl.create_default_context(cafile=str(link["certs"] / "ca.crt"))
    with urllib.request.urlopen(f"https://127.0.0.1:{link['public']}/health", context=ctx, timeout=10) as r:
        assert r.status == 200  # still serving


def _post(link, path: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(link["certs"] / "ca.crt"))
    req = urllib.request.Request(f"https://127.0.0.1:{link['public']}{path}", data=body, method="POST",
                                 headers={"content-type": "application/protobuf", **headers})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=30) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


@pytest.mark.slow
def test_a_captured_node_auth_header_is_refused_after_the_window(link):
    """Flower signs only the timestamp and accepts it for 305 s, on any endpoint with any body; fedllm's
    SuperLink refuses it once it is --max-signature-age-s old (3 s here, 10 s by default)."""
    captured = _signed(link["key"])
    fresh_status, fresh_detail = _post(link, "/v1/fleet/pull-messages", captured, b"")
    time.sleep(SIGNATURE_AGE_S + 0.5)
    replay_status, replay_detail = _post(link, "/v1/fleet/push-object", captured, b"\x08\x01 another body")
    assert "signature dated" not in fresh_detail, fresh_detail  # in the window: Flower's own checks answer
    assert replay_status == 401 and "signature dated" in replay_detail, (replay_status, replay_detail)
    from cryptography.hazmat.primitives.asymmetric import ec

    stranger = _signed(ec.generate_private_key(ec.SECP384R1()))
    status, detail = _post(link, "/v1/fleet/register-node", stranger, b"\x00" * 1024)
    assert status == 401 and "not registered" in detail, (status, detail)  # a valid signature, an unknown key


ATTACKER = r'''
import json, sys
from pathlib import Path
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, SuperExecAuthHttpInterceptor
from flwr.supernode.runtime.run_clientapp import pull_task_input
import itertools
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.retry.retry_invoker import RetryInvoker
from flwr.supercore.runtime import RuntimeHttpClient
from fedllm.federation.flower.executor import ACQUIRE_METHOD

address, secret_file = sys.argv[1], sys.argv[2]
out = {}
try:
    Path(secret_file).read_bytes()
    out["read the secret"] = "read it"
except OSError as exc:
    out["read the secret"] = f"refused: {type(exc).__name__}"

def attempt(call, *interceptors):  # Flower's own client, one try (its retry loop SIGINTs itself on a 401)
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=RetryInvoker(lambda: itertools.repeat(0.0), Exception, max_tries=1, max_time=None))
    try:
        return call(client)
    except Exception as exc:
        return f"refused: {type(exc).__name__}: {str(exc)[:160]}"
    finally:
        client.close()

def acquire(client):
    got = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    return "took a task" if got.HasField("task") and got.token else "no task"

out["acquire without the secret"] = attempt(acquire)
out["acquire with a guessed secret"] = attempt(acquire, SuperExecAuthHttpInterceptor(
    master_secret=b"guess" * 8, protected_methods={ACQUIRE_METHOD}))
out["pull with a guessed token"] = attempt(lambda c: (pull_task_input(c), "pulled the message")[1],
                                           RuntimeTokenHttpInterceptor("0" * 256))
print(json.dumps(out))
'''


def _as_another_user(args: list[str]) -> tuple[list[str], str]:
    """``args`` run as ``nobody`` when this test runs as root (a second uid), else as this user without the secret."""
    import os
    import shutil

    if os.geteuid() == 0 and shutil.which("setpriv"):
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *args], "nobody"
    return args, "this user, without the secret"


@pytest.mark.slow
def test_a_local_user_cannot_take_a_sites_tasks(link):
    """Issue 32, break 1: in subprocess isolation (the old step 5) a local user pulled a site's tasks, read
    the global state and answered in its name. The guide's site (fedllm SuperNode in process isolation
    with a 0600 secret file) holds a pending task; another local user can neither read the secret nor
    acquire the task nor pull it with a guessed token, and the secret's holder then acquires it."""
    from fedllm.config import dump_recipe, load_recipe
    from fedllm.federation.flower.executor import ACQUIRE_METHOD, ExecutorOptions, runtime_client
    from fedllm.federation.flower.worker import write_secret

    tmp, kids = link["tmp"], link["kids"]
    secret = tmp / "keys" / "site0.superexec"
    write_secret(secret)
    node_port, bare_port = free_port(), free_port()
    site = ["--superlink", f"127.0.0.1:{link['public']}", "--root-certificates", str(link["certs"] / "ca.crt"),
            "--host", "127.0.0.1", "--isolation", "process", "--node-config", "partition-id=0"]
    kids.start("supernode0", [sys.executable, "-m", "fedllm.federation.flower", "supernode", *site,
                              "--auth-supernode-private-key", str(link["key_path"]), "--port", str(node_port),
                              "--superexec-auth-secret-file", str(secret)])
    # the control: Flower's own SuperNode in process isolation without a secret (fedllm refuses to start one)
    bare_key = make_node_key(tmp / "keys" / "bare")
    registered = _flwr(link["env"], link["home"], "supernode", "register", str(bare_key) + ".pub", CONNECTION)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    kids.start("bare", [exe("flower-supernode"), *site, "--auth-supernode-private-key", str(bare_key),
                        "--port", str(bare_port)])
    for name in ("supernode0", "bare"):
        kids.wait_until(lambda n=name: "SuperNode ID" in kids.tail(n, 20000), f"{name} to connect",
                        time.monotonic() + 120, [name])
    tiny = Path(__file__).resolve().parents[1] / "recipes" / "tiny.yaml"
    recipe = load_recipe(tiny, ["partition.num_clients=1", "federation.rounds=1", "eval.bleu_samples=0"])
    app = write_app(tmp / "app", FlowerRunConfig(dump_recipe(recipe), str(tmp / "runs"), 60.0))
    submitted = _flwr(link["env"], link["home"], "run", str(app), CONNECTION)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    for name in ("supernode0", "bare"):
        kids.wait_until(lambda n=name: "Received successfully" in kids.tail(n, 20000),
                        f"{name} to receive the ServerApp's first message", time.monotonic() + 240, [name])
    time.sleep(1)  # the message becomes a task on the Runtime API

    def attack(port: int) -> dict[str, str]:
        cmd, who = _as_another_user([sys.executable, "-c", ATTACKER, f"127.0.0.1:{port}", str(secret)])
        done = subprocess.run(cmd, env={**link["env"], "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
                              capture_output=True, text=True, timeout=180, cwd="/")
        assert done.returncode == 0, done.stderr[-2000:]
        print(f"as {who} against 127.0.0.1:{port}: {done.stdout.strip().splitlines()[-1]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert attack(bare_port)["acquire without the secret"] == "took a task"  # the attack is real
    seen = attack(node_port)
    assert all(v.startswith("refused") for v in seen.values()), seen

    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    owner = runtime_client(ExecutorOptions(f"127.0.0.1:{node_port}", secret.read_bytes()),
                           SuperExecAuthHttpInterceptor(master_secret=secret.read_bytes(),
                                                        protected_methods={ACQUIRE_METHOD}))
    try:
        got = owner.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    finally:
        owner.close()
    assert got.HasField("task") and got.token, "no task was pending: the refusals above prove nothing"
