"""What a fedllm deployment exposes, and the only apps it runs.

Flower 1.41's ``flower-superlink`` serves its Fleet API (what SuperNodes talk to), its Control
API (register SuperNodes, submit apps with ``flwr run``) and its Runtime API (what the ServerApp
process talks to) on **one** HTTP port, and the Control API has no authentication of its own in
the open-source distribution. Bound to a public address as a deployment needs, that port lets
anyone holding the CA certificate register a SuperNode key and submit an app whose server part
runs on the coordinator and whose client part runs on every site (reproduced in
``tests/test_deploy_gate.py``). Flower's own app pinning (``flower-supernode --trusted-entities``)
verifies signatures that only Flower Hub issues, so it cannot pin a locally built app.

fedllm therefore starts both ends itself (``python -m fedllm.federation.flower superlink|supernode``):

- :func:`serve_superlink` runs Flower's SuperLink application on **two** listeners in one
  process: the public one (``--public HOST:PORT``) answers only the Fleet API (``/v1/fleet/...``)
  and ``/health``; everything else there is a 404. Control and Runtime are served on a loopback
  listener only (``--host 127.0.0.1 --port ...``), where the operator runs ``flwr supernode
  register`` and ``flwr run``. TLS and SuperNode authentication are on unless ``--insecure`` is
  given. The Control API also refuses to start any app that is not fedllm's (:func:`fab_problem`).
  The public listener caps each request's size, rate and signature age before Flower reads it
  (:mod:`fedllm.federation.flower.limits`), and an environment that would make Flower open
  another API is refused (:mod:`fedllm.federation.flower.flags`).
- :func:`serve_supernode` runs Flower's SuperNode with the same check on every app it is sent:
  a FAB that is not fedllm's is answered with Flower's own "FAB could not be verified" error and
  none of its code is installed or run. Its Runtime API stays on loopback in process isolation,
  where only a holder of the SuperExec secret (fedllm's executor) can take the site's tasks;
  Flower's default subprocess isolation, whose Runtime API has no authentication, is refused.

Both parse Flower's arguments with Flower's own parser before checking them, so ``--flag=value``
and abbreviations mean what Flower will take them to mean.

A fedllm app (what :func:`fedllm.federation.flower.launch.write_app` writes) carries no code: its
FAB is a ``pyproject.toml`` naming the *installed* ``fedllm.federation.flower.apps`` objects, no
dependencies, and the run config keys of
:class:`~fedllm.federation.flower.run_config.FlowerRunConfig`. What runs is therefore always the
fedllm version installed on the machine.

This module touches private parts of Flower 1.41 (the SuperLink's config parser and lifespan, the
Control API's ``start_run`` handler, the SuperNode's message loop and its fixed poll sleeps); ``fedllm[flower]`` pins flwr to
1.41.0 and :func:`_require` fails loudly if one of them moved.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import logging
import os
import sys
import time
import types
import zipfile
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: flwr brings tomli
    import tomli as tomllib

from fedllm.federation.flower.flags import (
    env_problem,
    is_loopback,
    parse_flower,
    split_address,
    superlink_listeners,
    superlink_problem,
    supernode_listeners,
    supernode_problem,
)
from fedllm.federation.flower.limits import PublicLimits, guarded

logger = logging.getLogger(__name__)

APPS_MODULE = "fedllm.federation.flower.apps"
COMPONENTS = {"serverapp": f"{APPS_MODULE}:server_app", "clientapp": f"{APPS_MODULE}:client_app"}
FAB_FILES = {"pyproject.toml", ".info/CONTENT"}
RUN_CONFIG_KEYS = {"recipe", "out", "timeout-s", "engine", "resume"}
PUBLIC_PREFIXES = ("/v1/fleet/",)  # the only API a site needs
PUBLIC_PATHS = {"/health"}

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def fab_problem(content: bytes) -> str | None:
    """Why this Flower App Bundle is not a fedllm app (``None`` when it is one).

    A fedllm FAB holds only ``pyproject.toml`` (and Flower's ``.info/CONTENT`` manifest), names
    exactly fedllm's installed ServerApp and ClientApp, has no dependencies, and its run config
    has only :class:`~fedllm.federation.flower.run_config.FlowerRunConfig`'s keys.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as zf:
            names = set(zf.namelist())
            extra = sorted(names - FAB_FILES)
            if extra:
                return f"it carries files besides pyproject.toml: {extra[:5]}"
            if "pyproject.toml" not in names:
                return "it has no pyproject.toml"
            project = tomllib.loads(zf.read("pyproject.toml").decode("utf-8"))
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as e:
        return f"it is not a readable app bundle ({type(e).__name__})"
    deps = project.get("project", {}).get("dependencies", [])
    if deps:
        return f"it declares dependencies {deps[:5]}"
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    components = app.get("components", {})
    if components != COMPONENTS:
        return f"its components are {components}, expected {COMPONENTS}"
    unknown = sorted(set(app.get("config", {})) - RUN_CONFIG_KEYS)
    if unknown:
        return f"its run config has keys {unknown[:5]} besides {sorted(RUN_CONFIG_KEYS)}"
    return None


def fleet_only(app: ASGIApp) -> ASGIApp:
    """``app`` as the public listener serves it: the Fleet API and ``/health``, nothing else."""

    async def public(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)):
            await app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = b'{"detail":"not served on this port"}'
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return public


def _require(module: Any, *names: str) -> None:
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise RuntimeError(f"{module.__name__} lacks {missing}: fedllm's deployment gate needs flwr==1.41.0 "
                           "(pip install 'fedllm[flower]')")


def pin_control_api() -> None:
    """Make the SuperLink's Control API refuse to start any app that is not fedllm's."""
    from flwr.supercore.error import ApiErrorCode, FlowerError  # noqa: PLC0415
    from flwr.superlink.servicer.control import control_handlers  # noqa: PLC0415

    _require(control_handlers, "start_run")
    original = control_handlers.start_run
    if getattr(original, "fedllm_pinned", False):
        return

    def start_run(request: Any, *args: Any, **kwargs: Any) -> Any:
        content = bytes(request.fab.content)
        problem = fab_problem(content) if content else "it names a stored or Hub app, not a bundle"
        if request.app_spec:
            problem = f"it names the Hub app {request.app_spec!r}"
        if problem is not None:
            logger.error("refused to start an app that is not fedllm's: %s", problem)
            msg = f"this SuperLink runs only fedllm's apps; refused: {problem}"
            raise FlowerError(ApiErrorCode.NO_PERMISSIONS, msg, public_details=msg)
        return original(request, *args, **kwargs)

    start_run.fedllm_pinned = True  # type: ignore[attr-defined]
    control_handlers.start_run = start_run


def serve_superlink(flower_args: list[str], public: str, insecure_ok: bool = False,
                    limits: PublicLimits | None = None) -> None:
    """Flower's SuperLink with the Fleet API on ``public`` and everything else on loopback only.

    ``flower_args`` are ``flower-superlink``'s own arguments, parsed by Flower's own parser and
    checked on the result (:func:`~fedllm.federation.flower.flags.superlink_problem`): their
    ``--host``/``--port`` are the loopback listener (Control + Runtime + Fleet) and ``--host`` must
    be a loopback address; ``--insecure`` is refused unless ``insecure_ok`` (``--allow-insecure``:
    loopback tests only); ``--enable-supernode-auth`` is required with TLS; an environment that
    would make Flower open another API (:data:`~fedllm.federation.flower.flags.OPENING_ENV`) is
    refused. The public listener takes each request through ``limits``' caps before Flower reads it.
    """
    import uvicorn  # noqa: PLC0415
    from flwr.superlink.main import create_app  # noqa: PLC0415

    fs = importlib.import_module("flwr.superlink.cli.flower_superlink")  # the package re-exports a function by that name

    _require(fs, "_parse_superlink_lifespan_config", "_parse_args_run_superlink", "SuperLinkLifespan")
    limits = limits or PublicLimits()
    public_host, public_port = split_address(public, "--public")
    ns = parse_flower("superlink", flower_args)
    problem = env_problem(os.environ) or superlink_problem(ns, insecure_ok)
    if problem is not None:
        raise SystemExit(f"fedllm superlink: {problem}")
    saved, sys.argv = sys.argv, ["flower-superlink", *flower_args]
    try:
        config = fs._parse_superlink_lifespan_config()  # noqa: SLF001  (Flower's own argument checks)
    finally:
        sys.argv = saved
    if not is_loopback(config.host) or config.simulation:  # the same parser: cannot differ from the checks
        raise SystemExit(f"fedllm superlink: Flower read --host {config.host}; expected a loopback address")
    pin_control_api()
    app = create_app(config, fs.SuperLinkLifespan)
    tls = {"ssl_keyfile": config.ssl_keyfile, "ssl_certfile": config.ssl_certfile}
    private = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, access_log=True,
                                            workers=1, **tls))
    front = guarded(fleet_only(app), limits, _key_registered(app) if config.enable_supernode_auth else None)
    outside = uvicorn.Server(uvicorn.Config(front, host=public_host, port=public_port, lifespan="off",
                                            access_log=True, workers=1, limit_concurrency=limits.max_connections,
                                            **tls))
    logger.info("fedllm superlink: %s; caps per request: %s bytes, %g requests/s per client IP, node-auth "
                "signatures at most %g s old", superlink_listeners(ns, public),
                f"{limits.max_request_bytes:,}", limits.rate_per_s, limits.max_signature_age_s)
    asyncio.run(_serve_both(private, outside))


def _key_registered(app: Any) -> Callable[[bytes], Awaitable[bool]]:
    """Whether a SuperNode public key is registered with this SuperLink (asked off the event loop)."""

    def lookup(public_key: bytes) -> bool:
        return app.state.linkstate_factory.state().get_node_id_by_public_key(public_key) is not None

    async def registered(public_key: bytes) -> bool:
        return await asyncio.to_thread(lookup, public_key)

    return registered


async def _serve_both(private: Any, outside: Any) -> None:
    """Serve both listeners; when one stops (a signal, a bind error) the other stops too."""
    main = asyncio.create_task(private.serve())  # owns the lifespan and the signal handlers
    await asyncio.sleep(0)
    while not private.started and not main.done():
        await asyncio.sleep(0.05)
    side = asyncio.create_task(outside._serve())  # noqa: SLF001  (no second set of signal handlers)
    done, _ = await asyncio.wait({main, side}, return_when=asyncio.FIRST_COMPLETED)
    private.should_exit = outside.should_exit = True
    await asyncio.gather(main, side, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()


def pin_supernode_apps() -> None:
    """Make this process's SuperNode answer any app that is not fedllm's with a verification error."""
    from flwr.supernode import start_client_internal as sci  # noqa: PLC0415

    _require(sci, "_pull_and_store_message", "_insert_message", "FAB_VERIFICATION_ERROR")
    original = sci._pull_and_store_message  # noqa: SLF001
    if getattr(original, "fedllm_pinned", False):
        return
    from flwr.app import Message  # noqa: PLC0415

    class Refused(Exception):
        pass

    def pull_and_store(**kw: Any) -> int | None:
        received: list[Any] = []
        receive, get_fab = kw["receive"], kw["get_fab"]

        def recording_receive() -> Any:
            got = receive()
            if got is not None:
                received.append(got[0])
            return got

        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            problem = fab_problem(bytes(fab.content))
            if problem is not None:
                raise Refused(problem)
            return fab

        try:
            return original(**{**kw, "receive": recording_receive, "get_fab": checked_get_fab})
        except Refused as refused:
            message = received[-1]
            logger.error("refused run %s: its app is not fedllm's (%s); nothing of it was installed or run",
                         message.metadata.run_id, refused)
            sci._insert_message(Message(sci.FAB_VERIFICATION_ERROR, reply_to=message),  # noqa: SLF001
                                kw["state"], kw["object_store"])
            return message.metadata.run_id

    pull_and_store.fedllm_pinned = True  # type: ignore[attr-defined]
    sci._pull_and_store_message = pull_and_store  # noqa: SLF001


SUPERNODE_POLL_S = 0.1  # the longest a SuperNode waits between pulls, and between checks for a reply


def capped_time(cap: float) -> types.ModuleType:
    """The ``time`` module as Flower's SuperNode loop sees it, with every sleep capped at ``cap`` s.

    Flower 1.41's loop sleeps a fixed 3 s after a pull that found no message and 0.5 s between
    checks for the ClientApp's reply, so each training request waited 1.75 s on average before it
    started and after it ended. A pull is one request to the SuperLink; capping the idle sleep at
    0.1 s costs each idle site ten such requests a second.
    """
    shim = types.ModuleType("time", "time, with sleeps capped for fedllm's SuperNode")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    shim.sleep = lambda seconds: time.sleep(min(seconds, cap))
    shim.fedllm_cap = cap
    return shim


def quicken_supernode_loop(cap: float = SUPERNODE_POLL_S) -> None:
    """Cap the sleeps of this process's SuperNode message loop (see :func:`capped_time`)."""
    from flwr.supernode import start_client_internal as sci  # noqa: PLC0415

    _require(sci, "time", "_push_messages", "start_client_internal")
    if not hasattr(sci.time, "fedllm_cap"):
        sci.time = capped_time(cap)


PULL_RETRY_S = (0.02, 0.25)  # first wait and longest wait before asking again for an object not yet stored


def quicken_object_pulls(first: float = PULL_RETRY_S[0], cap: float = PULL_RETRY_S[1]) -> None:
    """Retry pulls of a message's objects after ``first`` s, doubling up to ``cap`` s (Flower: 1 s, up to 10 s).

    A message is announced before its objects are stored: the SuperNode starts the ClientApp task
    while it is still fetching the model from the SuperLink, and the ServerApp sees a reply before
    the SuperNode has pushed all of its parts. The reader's first pull then finds the object
    missing and Flower 1.41 waits a full second before it asks again, on every hop: three such
    waits were 3 of a tiny round's 6 s. Each retry is one small request on a connection that is
    already open. Applies to this process's Flower object pulls (SuperNode, ServerApp, executor).
    """
    from flwr.supercore.inflatable import inflatable_utils as iu  # noqa: PLC0415

    _require(iu, "pull_objects", "pull_and_inflate_object_from_tree")
    for fn in (iu.pull_objects, iu.pull_and_inflate_object_from_tree):
        defaults = fn.__kwdefaults__
        if defaults is None or "initial_backoff" not in defaults or "backoff_cap" not in defaults:
            raise RuntimeError(f"Flower's {fn.__qualname__} no longer takes initial_backoff/backoff_cap; "
                               "fedllm supports flwr 1.41.0")
        defaults["initial_backoff"], defaults["backoff_cap"] = first, cap


def serve_supernode(flower_args: list[str], insecure_ok: bool = False) -> None:
    """Flower's ``flower-supernode`` (its own arguments) that runs only fedllm's apps.

    The arguments are parsed by Flower's own parser and checked on the result
    (:func:`~fedllm.federation.flower.flags.supernode_problem`): TLS and a node key, and the
    Runtime API on loopback in process isolation with a SuperExec secret file (0600), so only the
    site's executor can take its tasks. Subprocess isolation (Flower's default), whose Runtime API
    takes any local process, is refused unless ``insecure_ok`` (``--allow-insecure``: loopback tests).
    """
    from flwr.supernode.cli.flower_supernode import flower_supernode  # noqa: PLC0415

    ns = parse_flower("supernode", flower_args)
    problem = supernode_problem(ns, insecure_ok)
    if problem is not None:
        raise SystemExit(f"fedllm supernode: {problem}")
    pin_supernode_apps()
    quicken_supernode_loop()
    quicken_object_pulls()
    logger.info("fedllm supernode: %s", supernode_listeners(ns))
    saved, sys.argv = sys.argv, ["flower-supernode", *flower_args]
    try:
        flower_supernode()
    finally:
        sys.argv = saved
