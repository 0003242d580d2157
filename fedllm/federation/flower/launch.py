"""A whole Flower deployment on this machine (127.0.0.1 only): tests, benchmarks, trying it out.

:func:`run_deployment` starts what docs/deploy.md starts by hand on several machines — fedllm's
SuperLink (``python -m fedllm.federation.flower superlink``: the Fleet API on its public port,
Control and Runtime on a second, loopback-only port), one fedllm SuperNode per client (each with
its own ``--node-config``; it runs only fedllm's apps), optionally one warm fedllm worker per
site — then submits the recipe with ``flwr run --stream`` on the Control port and returns the
run's ``summary.json``. TLS and SuperNode authentication are on by default (throw-away CA,
certificates and keys). Every child gets its own session and a private ``FLWR_HOME``; all of them
(and their own children, e.g. ``flwr-clientapp``) are ended when the run finishes or fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil
import tomli_w

from fedllm.config import Recipe, dump_recipe
from fedllm.federation.flower.run_config import TELEMETRY_OFF, FlowerRunConfig
from fedllm.federation.flower.worker import write_secret
from fedllm.federation.rundir import run_dir

CONNECTION = "fedllm"  # the SuperLink connection's name in FLWR_HOME/config.toml


@dataclass(frozen=True)
class LaunchOptions:
    """How :func:`run_deployment` starts Flower's processes on this machine."""

    isolation: Literal["subprocess", "process"] = "process"  # SuperNode ClientApp isolation (process: fastest)
    # model and data loaded once per site: under "subprocess" a warm fedllm worker that each message's
    # flwr-clientapp forwards to; under "process" fedllm's executor, which runs every ClientApp task in
    # one long-lived process (no process per message). False: Flower's default, a process per message.
    warm_workers: bool = True
    timeout_s: float = 600.0  # wall-clock limit for the whole run (and for one client's reply)
    poll_interval_s: float = 0.05  # FLWR_SUPEREXEC_TASK_POLL_INTERVAL (Flower's default: 1 s)
    log_dir: str | None = None  # keep the processes' logs here (default: a temporary folder)
    tls: bool = True  # TLS on the SuperLink (a throw-away CA and server certificate for 127.0.0.1)
    node_auth: bool = True  # SuperNode authentication: one ECDSA key per site, registered with flwr
    # pass --allow-insecure to fedllm's SuperNodes: needed for isolation="subprocess", whose Runtime API
    # takes any local process (benchmarks and tests on a machine of one's own only)
    allow_insecure: bool = False

    def __post_init__(self) -> None:
        if self.isolation not in ("subprocess", "process"):
            raise ValueError(f"LaunchOptions.isolation: expected 'subprocess' or 'process', got {self.isolation!r}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ValueError(f"LaunchOptions.timeout_s: expected a positive number of seconds, got {self.timeout_s}")
        if not 0.01 <= self.poll_interval_s <= 60:
            raise ValueError(f"LaunchOptions.poll_interval_s: expected in [0.01, 60], got {self.poll_interval_s}")
        if self.isolation == "subprocess" and not self.allow_insecure:
            raise ValueError("LaunchOptions.isolation='subprocess': the SuperNodes' Runtime API would take any "
                             "local process as a site's ClientApp; set allow_insecure=True (a machine of one's "
                             "own only) or use isolation='process'")
        if self.tls != self.node_auth:
            raise ValueError("LaunchOptions: tls and node_auth go together (Flower's node authentication needs "
                             f"TLS; fedllm's SuperLink requires node authentication with TLS), got tls={self.tls}, "
                             f"node_auth={self.node_auth}")


class Children:
    """Child processes, each in its own session; closing ends every one's whole process tree."""

    def __init__(self, log_dir: Path, env: dict[str, str], cwd: Path) -> None:
        self.log_dir, self.env, self.cwd = log_dir, env, cwd
        self.procs: dict[str, subprocess.Popen] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Children:
        return self

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        with (self.log_dir / f"{name}.log").open("wb") as fh:
            proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.cwd, start_new_session=True)
        self.procs[name] = proc
        return proc

    def check_alive(self, *names: str) -> None:
        for name in names or list(self.procs):
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with code {self.procs[name].returncode}:\n{self.tail(name)}")

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def wait_until(self, ready: Callable[[], bool], what: str, deadline: float, names: list[str]) -> None:
        """Poll ``ready`` until true; fail early if one of ``names`` died, or at ``deadline``."""
        while not ready():
            self.check_alive(*names)
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        tree: list[psutil.Process] = []
        for proc in self.procs.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                root = psutil.Process(proc.pid)
                tree += [root, *root.children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(tree, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired, ChildProcessError, OSError):
                proc.wait(timeout=1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def exe(name: str) -> str:
    """A console script of this environment (flower-superlink, flwr, ...)."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found; install Flower with pip install 'fedllm[flower]'")
    return found


def write_app(app_dir: Path, cfg: FlowerRunConfig) -> Path:
    """A Flower App directory whose pyproject names fedllm's apps and carries the run config."""
    app_dir.mkdir(parents=True, exist_ok=True)
    here = "fedllm.federation.flower.apps"
    project = {"project": {"name": "fedllm-run", "version": "1.0.0", "license": "Apache-2.0",
                           "description": "a fedllm recipe on Flower", "dependencies": []},
               "tool": {"flwr": {"app": {"publisher": "fedllm",
                                         "components": {"serverapp": f"{here}:server_app",
                                                        "clientapp": f"{here}:client_app"},
                                         "config": cfg.to_user_config()}}}}
    (app_dir / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    return app_dir


def child_env(home: Path, opts: LaunchOptions) -> dict[str, str]:
    """This process's environment, telemetry off, a private FLWR_HOME and fast task polling."""
    env = dict(os.environ)
    # Flower's processes start their helpers (flower-superexec, flwr-clientapp, ...) by name
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(TELEMETRY_OFF, FLWR_HOME=str(home), FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(opts.poll_interval_s))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def make_certificates(folder: Path) -> Path:
    """A CA and a SuperLink certificate for 127.0.0.1/localhost (docs/deploy.md's openssl commands)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=fedllm-test-ca"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=superlink"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
         "server.pem", "-days", "2", "-extfile", "san.ext"],
    ]
    for args in steps:
        subprocess.run([exe("openssl"), *args], cwd=folder, check=True, capture_output=True, timeout=60)
    return folder


def make_node_key(path: Path) -> Path:
    """An ECDSA key pair in OpenSSH format (what flower-supernode --auth-supernode-private-key reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe("ssh-keygen"), "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(path)], check=True,
                   capture_output=True, timeout=60)
    return path


def _link_args(certs: Path | None) -> list[str]:
    if certs is None:
        return ["--insecure"]
    return ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
            "--ssl-keyfile", str(certs / "server.key")]


def start_sites(kids: Children, tmp: Path, port: int, num: int, opts: LaunchOptions, deadline: float,
                data_paths: list[str] | None = None, certs: Path | None = None) -> None:
    """One warm worker (optional) and one SuperNode per client, all on loopback."""
    socks = [str(tmp / f"site{k}.sock") for k in range(num)]
    if opts.warm_workers and opts.isolation == "subprocess":
        for k, sock in enumerate(socks):
            kids.start(f"worker{k}", [sys.executable, "-m", "fedllm.federation.flower", "worker", "--socket", sock])
        for k, sock in enumerate(socks):
            kids.wait_until(lambda s=sock: Path(s).exists(), f"worker {k}", deadline, [f"worker{k}"])
    for k, sock in enumerate(socks):
        node_port = free_port()
        node_cfg = f"partition-id={k} num-partitions={num}"
        if opts.warm_workers and opts.isolation == "subprocess":
            node_cfg += f' worker="{sock}"'
        if data_paths:
            node_cfg += f' data-path="{data_paths[k]}"'
        security = ["--insecure"] if certs is None else ["--root-certificates", str(certs / "ca.crt")]
        if opts.node_auth:
            key = make_node_key(tmp / "keys" / f"site{k}")
            register = subprocess.run([exe("flwr"), "supernode", "register", str(key) + ".pub", CONNECTION],
                                      env=kids.env, cwd=kids.cwd, capture_output=True, text=True, timeout=120)
            if register.returncode != 0:
                raise RuntimeError(f"flwr supernode register failed:\n{register.stdout}\n{register.stderr}")
            security += ["--auth-supernode-private-key", str(key)]
        insecure = ["--allow-insecure"] if certs is None or opts.allow_insecure else []
        secret = []
        if opts.isolation == "process":  # only who holds it may acquire this site's tasks
            write_secret(tmp / "keys" / f"site{k}.superexec")
            secret = ["--superexec-auth-secret-file", str(tmp / "keys" / f"site{k}.superexec")]
        kids.start(f"supernode{k}", [sys.executable, "-m", "fedllm.federation.flower", "supernode", *insecure, *security, "--superlink", f"127.0.0.1:{port}",
                                     "--host", "127.0.0.1", "--port", str(node_port), "--isolation", opts.isolation,
                                     "--node-config", node_cfg, *secret])
        if opts.isolation == "process":
            runtime = ["--insecure", "--runtime-api-address", f"127.0.0.1:{node_port}", *secret]
            kids.start(f"executor{k}", [sys.executable, "-m", "fedllm.federation.flower", "executor", *runtime]
                       if opts.warm_workers else [exe("flower-superexec"), *runtime])


def start_superlink(kids: Children, home: Path, certs: Path | None, deadline: float,
                    fedllm_args: tuple[str, ...] = ()) -> int:
    """fedllm's SuperLink on two free loopback ports; ``home``'s flwr connection goes to the Control port.

    ``fedllm_args`` are fedllm's own superlink flags (``--max-request-mb``, ...). Returns the public
    (Fleet-only) port, the one the sites connect to.
    """
    public, control = free_port(), free_port()
    home.mkdir(parents=True, exist_ok=True)
    security = "insecure = true" if certs is None else f'root-certificates = "{certs / "ca.crt"}"'
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                      f'address = "127.0.0.1:{control}"\n{security}\n', encoding="utf-8")
    flower = [*_link_args(certs), *([] if certs is None else ["--enable-supernode-auth"]),
              "--host", "127.0.0.1", "--port", str(control), "--disable-runtime-dependency-installation"]
    kids.start("superlink", [sys.executable, "-m", "fedllm.federation.flower", "superlink",
                             "--public", f"127.0.0.1:{public}", *fedllm_args, *([] if certs else ["--allow-insecure"]),
                             *flower])
    kids.wait_until(lambda: port_open(control) and port_open(public), f"the SuperLink on ports {public}/{control}",
                    deadline, ["superlink"])
    return public


def run_deployment(recipe: Recipe, out: str | None = None, options: LaunchOptions | None = None,
                   data_paths: list[str] | None = None) -> dict[str, Any]:
    """Run ``recipe``'s federated rounds on a loopback Flower deployment; return ``summary.json``.

    fedllm's SuperLink (no runtime dependency installation) and one fedllm SuperNode per client;
    ``data_paths`` (one file per client) makes each site read its own file instead of its slice of
    the recipe's corpus. The run directory is ``<out>/<name>/federated/``.
    """
    opts, num = options or LaunchOptions(), recipe.partition.num_clients
    if data_paths is not None and len(data_paths) != num:
        raise ValueError(f"data_paths: expected {num} files (partition.num_clients), got {len(data_paths)}")
    out_root = Path(out or recipe.output.dir).resolve()
    cfg = FlowerRunConfig(dump_recipe(recipe), str(out_root), opts.timeout_s, "flower-deployment")
    summary = run_dir(recipe, "federated", str(out_root)) / "summary.json"
    started, deadline = time.time(), time.monotonic() + opts.timeout_s
    with tempfile.TemporaryDirectory(prefix="fedllm-flower-") as tmp_name:
        tmp = Path(tmp_name)
        app, home = write_app(tmp / "app", cfg), tmp / "flwr-home"
        certs = make_certificates(tmp / "certs") if opts.tls else None
        with Children(Path(opts.log_dir) if opts.log_dir else tmp / "logs", child_env(home, opts), tmp) as kids:
            port = start_superlink(kids, home, certs, deadline)
            start_sites(kids, tmp, port, num, opts, deadline, data_paths, certs)
            run = kids.start("flwr-run", [exe("flwr"), "run", str(app), CONNECTION, "--stream"])
            kids.wait_until(lambda: run.poll() is not None, "flwr run to finish", deadline, ["superlink"])
            if not summary.exists() or summary.stat().st_mtime < started:
                raise RuntimeError(f"the Flower run wrote no {summary} (flwr run exited {run.returncode}):\n"
                                   f"{kids.tail('flwr-run')}\n--- superlink ---\n{kids.tail('superlink')}")
    return json.loads(summary.read_text(encoding="utf-8"))
