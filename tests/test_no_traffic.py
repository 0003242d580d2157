"""No traffic nobody asked for: ``fedllm run --engine flower`` under a socket guard that allows loopback only.

Every Python process of the run (the CLI, Flower, Ray's dashboard, agents and workers: they
inherit ``PYTHONPATH``) loads a ``sitecustomize`` that refuses, and records, any connection or
name lookup that is not for a loopback address, this machine's own interface address (Ray's
agents reach their node by it; nothing leaves the machine) or a Unix socket. Without fedllm's
dead proxy (``fedllm.federation.flower.simulation``) Ray's dashboard asks 169.254.169.254 and
metadata.google.internal which cloud it runs on, usage stats off or not. The run must end well with nothing recorded: no Flower
telemetry, no update check, no Ray usage stats or cloud-metadata probe, no Hugging Face hub.
(Ray's own C++ daemons are not Python and are outside this guard; Ray is bound to 127.0.0.1.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GUARD = r'''
import errno, ipaddress, os, socket

import psutil

_LOG, _LOADED = os.environ["FEDLLM_GUARD_LOG"], os.environ["FEDLLM_GUARD_LOADED"]
with open(_LOADED, "a") as fh:
    fh.write(f"{os.getpid()}\n")
# this machine's own addresses: Ray's agents talk to their node by its interface address; a packet
# to it never leaves the machine
_OWN = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
        if a.family in (socket.AF_INET, socket.AF_INET6)}


def _local(host):
    if host in (None, "", "localhost", "ip6-localhost"):
        return True
    if isinstance(host, bytes):
        host = host.decode()
    host = str(host).split("%")[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback or host in _OWN
    except ValueError:
        return False


def _refuse(what):
    with open(_LOG, "a") as fh:
        fh.write(f"{os.getpid()} {what}\n")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse(f"connect {address!r}")
        raise OSError(errno.ENETUNREACH, "fedllm socket guard: only loopback")
    return _connect(self, address)


def connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
        _refuse(f"connect_ex {address!r}")
        return errno.ENETUNREACH
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _local(host):
        _refuse(f"getaddrinfo {host!r}")
        raise socket.gaierror(socket.EAI_NONAME, "fedllm socket guard: only loopback")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''


@pytest.mark.slow
def test_engine_flower_makes_no_connection_beyond_loopback(tmp_path):
    pytest.importorskip("ray")
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)
    log, loaded = tmp_path / "refused.log", tmp_path / "loaded.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "RAY_", "HF_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(guard), str(ROOT)]), FEDLLM_GUARD_LOG=str(log),
               FEDLLM_GUARD_LOADED=str(loaded), HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", "import sys; from fedllm.cli import main; sys.exit(main())",
                           "run", str(ROOT / "recipes" / "tiny.yaml"), "partition.num_clients=2",
                           "federation.rounds=1", "train.local_steps=1", "eval.bleu_samples=0", "data.max_examples=24",
                           "data.eval_size=4", "output.save_adapter=false",
                           "--engine", "flower", "--out", str(tmp_path / "runs")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    pids = set(loaded.read_text().split())
    assert len(pids) >= 2, "the guard did not reach Flower's ClientApp processes"  # the CLI and Ray's workers
    refused = log.read_text() if log.exists() else ""
    assert refused == "", f"connections beyond loopback were attempted:\n{refused}"
