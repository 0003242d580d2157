"""The flags and environment fedllm hands to Flower's SuperLink and SuperNode, read as Flower reads them.

The checks run on the namespace that Flower's own parser (the one ``flower-superlink`` /
``flower-supernode`` build) makes of the arguments, so ``--flag=value`` and abbreviations
(``--isol process``) mean here exactly what Flower will take them to mean; a raw-string scan
refused the first and let the second slip past (issue 32). Environment switches that make Flower
1.41 open an API beside fedllm's listeners are refused by name (:data:`OPENING_ENV`, from a grep
of ``flwr`` for ``os.getenv``/``os.environ`` in the SuperLink's and SuperNode's start-up).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import ipaddress
import os
import stat
from collections.abc import Mapping
from pathlib import Path

OPENING_ENV = {
    "FLWR_INTERNAL_GRPC_CONTROL_API": "starts Flower's gRPC Control API, which has no authentication, on "
                                      "--control-api-address (default 0.0.0.0:9093)",
    "FLWR_INTERNAL_GRPC_FLEET_API": "starts a second, gRPC Fleet API on --fleet-api-address (default 0.0.0.0:9092) "
                                    "outside fedllm's public listener and its caps",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def split_address(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"fedllm: {what}: expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def env_problem(environ: Mapping[str, str]) -> str | None:
    """Why this environment would re-open an API fedllm keeps closed (``None`` when it would not)."""
    for name, what in OPENING_ENV.items():
        if name in environ:
            return f"{name}={environ[name]!r} is set; in Flower 1.41 it {what}: unset it"
    return None


def parse_flower(which: str, args: list[str]) -> argparse.Namespace:
    """``args`` as ``flower-superlink`` (``which="superlink"``) or ``flower-supernode`` parses them."""
    if which == "superlink":
        module = importlib.import_module("flwr.superlink.cli.flower_superlink")
        parser = module._parse_args_run_superlink()  # noqa: SLF001  (Flower's own parser)
    else:
        module = importlib.import_module("flwr.supernode.cli.flower_supernode")
        parser = module._parse_args_run_supernode()  # noqa: SLF001
    parser.prog = f"python -m fedllm.federation.flower {which} (flower-{which} arguments)"
    return parser.parse_args(args)


def secret_file_problem(path: str) -> str | None:
    """Why ``path`` is no SuperExec secret file: it must be a non-empty regular file only its owner can read."""
    try:
        st = os.stat(Path(path).expanduser())
    except OSError as exc:
        return f"--superexec-auth-secret-file {path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"--superexec-auth-secret-file {path}: expected a regular file"
    if st.st_mode & 0o077:
        return (f"--superexec-auth-secret-file {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read it; "
                "expected 0600 (chmod 600, or write it with `python -m fedllm.federation.flower secret FILE`)")
    if st.st_size == 0:
        return f"--superexec-auth-secret-file {path}: empty"
    return None


def _health_problem(ns: argparse.Namespace) -> str | None:
    address = getattr(ns, "health_server_address", None)
    if address is not None and not is_loopback(address.rpartition(":")[0]):
        return f"--health-server-address {address}: Flower serves it without TLS; keep it on 127.0.0.1"
    return None


def superlink_problem(ns: argparse.Namespace, insecure_ok: bool) -> str | None:
    """Why fedllm's SuperLink refuses these (parsed) ``flower-superlink`` arguments."""
    if ns.insecure and not insecure_ok:
        return ("--insecure sends every update in clear text; give the TLS files "
                "(--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile)")
    if not ns.insecure and not ns.enable_supernode_auth:
        return "expected --enable-supernode-auth (only registered sites may connect)"
    if not is_loopback(ns.host):
        return (f"--host {ns.host} would expose the Control and Runtime APIs; expected a loopback address "
                "(the public address is --public)")
    if ns.simulation:
        return "--simulation is not a deployment"
    return _health_problem(ns)


def supernode_problem(ns: argparse.Namespace, insecure_ok: bool) -> str | None:
    """Why fedllm's SuperNode refuses these (parsed) ``flower-supernode`` arguments."""
    if ns.insecure and not insecure_ok:
        return ("--insecure sends this site's updates in clear text; give --root-certificates "
                "(the coordinator's CA certificate)")
    if not ns.insecure and not ns.auth_supernode_private_key:
        return "expected --auth-supernode-private-key (the site's registered key)"
    if ns.isolation == "subprocess" and not insecure_ok:
        return (f"--isolation subprocess (Flower's default) serves this site's Runtime API on {ns.host}:{ns.port} "
                "with no authentication: any local user could take its tasks, read the model and answer in its "
                "name. Use --isolation process --superexec-auth-secret-file FILE with fedllm's executor "
                "(docs/deploy.md, step 5)")
    if ns.isolation == "process":
        if ns.superexec_auth_secret_file is None:
            return ("--isolation process expected --superexec-auth-secret-file (a secret file shared with this "
                    "site's executor): without it any local process could take its tasks")
        problem = secret_file_problem(ns.superexec_auth_secret_file)
        if problem is not None:
            return problem
    if not is_loopback(ns.host):
        return f"--host {ns.host} would expose this site's Runtime API; expected a loopback address (127.0.0.1)"
    return _health_problem(ns)


def superlink_listeners(ns: argparse.Namespace, public: str) -> str:
    """One line: every address a fedllm SuperLink started with ``ns`` listens on, and what it takes."""
    tls = "clear text" if ns.insecure else "TLS"
    auth = "registered SuperNode keys only" if ns.enable_supernode_auth else "no node authentication"
    health = (f"gRPC health (no TLS) on {ns.health_server_address}" if ns.health_server_address
              else "no health listener")
    return (f"Fleet API only on {public} ({tls}, {auth}, capped before parsing); Control + Runtime on "
            f"{ns.host}:{ns.port} only ({tls}, no authentication: this machine's users); {health}; no gRPC "
            "Control or Fleet API (FLWR_INTERNAL_GRPC_* unset); nothing else")


def supernode_listeners(ns: argparse.Namespace) -> str:
    """One line: what a fedllm SuperNode started with ``ns`` listens on, and who may use it."""
    if ns.isolation == "process":
        runtime = (f"Runtime API on {ns.host}:{ns.port} (tasks only to a holder of the secret in "
                   f"{ns.superexec_auth_secret_file}; each task's calls need its one-time token)")
    else:
        runtime = f"Runtime API on {ns.host}:{ns.port} WITHOUT authentication (subprocess isolation, --allow-insecure)"
    health = (f"gRPC health (no TLS) on {ns.health_server_address}" if ns.health_server_address
              else "no health listener")
    link = "clear text" if ns.insecure else "TLS"
    return f"{runtime}; {health}; nothing else (the SuperLink at {ns.superlink} is dialled out, {link})"
