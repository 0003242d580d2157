"""A site's long-lived ClientApp executor: Flower's process isolation without a process per message.

Flower 1.41 starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives, in
both isolation modes: about 1.5 s of imports (httpx, Flower's CLI, the FAB installer) before the
app is even loaded, then the FAB is unpacked again. Under ``flower-supernode --isolation process``
the SuperNode only *offers* each task on its Runtime API and whatever acquires it runs it;
Flower's ``flower-superexec`` acquires and spawns ``flwr-clientapp``. This executor acquires
instead, and runs each task in this one process with the functions ``flwr-clientapp`` itself
uses (pull the message and context, run the app, push the reply and the task's status), so the
site's model and data stay loaded across rounds and no process starts per message.

It runs fedllm's *installed* ClientApp (:data:`fedllm.federation.flower.apps.client_app`) and
nothing else: a task whose app bundle is not fedllm's (:func:`~fedllm.federation.flower.gate.fab_problem`)
is answered with an error and none of its content is installed. Only an executor holding the
SuperNode's SuperExec secret (``--superexec-auth-secret-file``, the same file the SuperNode reads)
can acquire a task; each task's own calls carry the one-time token the SuperNode issued for it.
The Runtime API stays on loopback (``--runtime-api-address 127.0.0.1:PORT``) unless it has TLS.

Started as ``python -m fedllm.federation.flower executor --runtime-api-address 127.0.0.1:PORT
--superexec-auth-secret-file FILE [--insecure | --root-certificates CA]`` (docs/deploy.md).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
HEARTBEAT_S = 10.0  # how often a running task tells the SuperNode it is alive


@dataclass(frozen=True)
class ExecutorOptions:
    """Where the SuperNode's Runtime API is and how this executor proves who it is."""

    runtime_api_address: str
    secret: bytes  # the SuperExec auth secret, the SuperNode's --superexec-auth-secret-file
    insecure: bool = True
    root_certificates: bytes | None = None
    poll_s: float = 0.05  # between AcquireTask calls while idle


def runtime_client(opts: ExecutorOptions, *interceptors: Any) -> Any:
    """A Runtime API client of Flower's own, with ``interceptors`` after the version header."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor  # noqa: PLC0415
    from flwr.supercore.retry import make_simple_http_retry_invoker  # noqa: PLC0415
    from flwr.supercore.runtime import RuntimeHttpClient  # noqa: PLC0415

    return RuntimeHttpClient.from_server_address(
        server_address=opts.runtime_api_address, insecure=opts.insecure, root_certificates=opts.root_certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), *interceptors],
        retry_invoker=make_simple_http_retry_invoker())


class _Heartbeat:
    """Tell the SuperNode every :data:`HEARTBEAT_S` that the task is alive (failures are logged, not fatal).

    Flower's own sender raises SIGINT in its process when the SuperNode says the task is gone,
    which would end this long-lived executor; here that only ends the heartbeat.
    """

    def __init__(self, client: Any) -> None:
        from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # noqa: PLC0415

        self.client, self.request, self.stop = client, SendTaskHeartbeatRequest(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                if not self.client.SendTaskHeartbeat(self.request).success:
                    log.warning("fedllm executor: the SuperNode no longer knows this task")
                    return
            except Exception as exc:  # noqa: BLE001 - a missed heartbeat is the SuperNode's to judge
                log.warning("fedllm executor: heartbeat failed (%s)", type(exc).__name__)

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def run_task(opts: ExecutorOptions, token: str, client_app: Any, phases: dict[str, float] | None = None) -> str:
    """Run one acquired task in this process, as ``flwr-clientapp`` would; return its final status.

    ``phases`` (when given) receives the seconds spent pulling the message, running the app and pushing the reply.
    """
    from flwr.app import Message  # noqa: PLC0415
    from flwr.app.error import Error  # noqa: PLC0415
    from flwr.common.constant import ErrorCode, SubStatus  # noqa: PLC0415
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor  # noqa: PLC0415
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output  # noqa: PLC0415

    from fedllm.federation.flower.gate import fab_problem  # noqa: PLC0415

    client = runtime_client(opts, RuntimeTokenHttpInterceptor(token))
    message = context = reply = None
    status, details = SubStatus.FAILED, "the ClientApp failed"
    phases = {} if phases is None else phases
    t = time.perf_counter()
    try:
        with _Heartbeat(client):
            try:
                message, context, _run, fab = pull_task_input(client)
                phases["pull"], t = time.perf_counter() - t, time.perf_counter()
                problem = fab_problem(bytes(fab.content))
                if problem is not None:
                    raise PermissionError(f"the app is not fedllm's ({problem}); nothing of it was installed or run")
                reply = client_app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
                phases["app"], t = time.perf_counter() - t, time.perf_counter()
            except Exception as exc:  # noqa: BLE001 - the server counts it as a failed client
                log.warning("fedllm executor: task failed (%s: %s)", type(exc).__name__, exc)
                details = f"{type(exc)}:<'{exc}'>"
                if message is not None:
                    reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                                    reply_to=message)
            if reply is not None and context is not None:
                push_message(client, reply, context)
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        client.close()
        phases["push"] = time.perf_counter() - t
    return status


def serve_executor(opts: ExecutorOptions, stop: threading.Event | None = None) -> None:
    """Acquire this SuperNode's ClientApp tasks and run each one here, until ``stop`` is set or the process ends."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # noqa: PLC0415
    from flwr.supercore.constant import TaskType  # noqa: PLC0415
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor  # noqa: PLC0415

    from fedllm.federation.flower.apps import client_app  # noqa: PLC0415
    from fedllm.federation.flower.gate import quicken_object_pulls  # noqa: PLC0415

    quicken_object_pulls()
    acquirer = runtime_client(opts, SuperExecAuthHttpInterceptor(master_secret=opts.secret,
                                                                 protected_methods={ACQUIRE_METHOD}))
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    stop = stop or threading.Event()
    log.info("fedllm executor: serving ClientApp tasks of the SuperNode at %s", opts.runtime_api_address)
    try:
        while not stop.is_set():
            got = acquirer.AcquireTask(request)
            if got.HasField("task") and got.token:
                t0, phases = time.perf_counter(), {}
                status = run_task(opts, got.token, client_app, phases)
                log.info("fedllm executor: task %d %s in %.2f s (%s)", got.task.task_id, status,
                         time.perf_counter() - t0, ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
            else:
                stop.wait(opts.poll_s)
    finally:
        acquirer.close()


def options_from_args(address: str, secret_file: str, insecure: bool, root_certificates: str | None) -> ExecutorOptions:
    """Check the command line's choices (see :mod:`fedllm.federation.flower.__main__`)."""
    from fedllm.federation.flower.gate import is_loopback, split_address  # noqa: PLC0415

    host, _ = split_address(address, "--runtime-api-address")
    if insecure and not is_loopback(host):
        raise SystemExit(f"fedllm executor: --insecure on {address} would send this site's model in clear text "
                         "over the network; keep the Runtime API on 127.0.0.1 or give --root-certificates")
    if insecure == (root_certificates is not None):
        raise SystemExit("fedllm executor: give exactly one of --insecure (loopback) and --root-certificates")
    secret = Path(secret_file).read_bytes()
    if not secret:
        raise SystemExit(f"fedllm executor: {secret_file} is empty")
    certs = None if root_certificates is None else Path(root_certificates).read_bytes()
    return ExecutorOptions(address, secret, insecure, certs)
