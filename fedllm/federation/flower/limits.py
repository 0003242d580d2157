"""What the SuperLink's public listener accepts before Flower reads, parses or verifies anything.

Flower 1.41's Fleet HTTP API reads a request's whole body, parses it as protobuf and only then
checks the SuperNode's signature (``flwr/superlink/routers/fleet/node_auth.py``): three 400 MiB
POSTs from a client with no key raised a SuperLink from 1.0 to 3.4 GB (issue 32). :func:`guarded`
wraps the public app so that, per request and before the app sees it:

1. each client IP (an IPv6 /64) spends one token of a bucket refilled at ``rate_per_s`` (burst
   ``4 x rate``); an empty bucket is a 503 with ``Retry-After: 1``, not a 429: Flower 1.41's
   client retries a 503 and gives up on a 429 (``flwr/supercore/retry/http_retry.py``), and a
   site that bursts past the rate should slow down, not fail;
2. a ``Content-Length`` over ``max_request_bytes`` is a 413 and the connection is closed, nothing
   of the body read; a streamed (chunked) body is counted as it arrives and cut the same way;
3. the body bytes in flight are reserved against two budgets, ``max_inflight_bytes`` for the
   process and two requests' worth per client IP (503 when full), so the memory all bodies can
   hold at once is bounded whatever the number of connections; a body not complete within
   ``body_timeout_s`` is cut (408);
4. on ``/v1/fleet/`` (with node authentication on) the node-auth headers are checked first: the
   signed timestamp must be at most ``max_signature_age_s`` old (Flower accepts 300 s + 5 s),
   the signature must verify, and the key must be registered. A stranger's request is a 401
   before a byte of its body is read.

Flower's SuperNode signs only the timestamp (``flwr/supernode/node_auth_http_interceptor.py``):
the signature says "the holder of this key, at this time", not what the request is. A captured
header is therefore good for any request until it is ``max_signature_age_s`` old; TLS is what
keeps headers from being captured.

The largest request a Flower 1.41 SuperNode sends is one object push: an array chunk of at most
``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE`` (5 MiB, ``flwr/app/message/array.py``) plus ~200 bytes of
protobuf, or a compressed update's payload, which travels unchunked in a ConfigRecord
(:mod:`fedllm.federation.flower.codec`). The default cap (32 MiB) is six chunks.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import datetime
import ipaddress
import math
import time
from base64 import b64decode
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MIB = 1024 * 1024
FLOWER_CHUNK_BYTES = 5 * MIB  # Flower 1.41's FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE default
CLOCK_SKEW_S = 5.0  # a signature may be dated this far in the future (Flower's SYSTEM_TIME_TOLERANCE)
FLEET_PREFIX = "/v1/fleet/"
AUTH_HEADERS = (b"flwr-timestamp", b"flwr-public-key", b"flwr-signature")


@dataclass(frozen=True)
class PublicLimits:
    """Caps on what one request to the public (Fleet) listener may cost before it is authenticated."""

    max_request_bytes: int = 32 * MIB  # one request's body; above: 413, connection closed
    rate_per_s: float = 200.0  # requests per second per client IP (an idle site polls ~10/s); above: 503
    max_signature_age_s: float = 10.0  # oldest node-auth timestamp accepted (Flower: 305 s)
    max_inflight_bytes: int = 256 * MIB  # all bodies being received at once; above: 503
    body_timeout_s: float = 120.0  # longest time to receive one body; above: 408
    max_connections: int = 256  # uvicorn's limit_concurrency on the public listener; above: 503

    def __post_init__(self) -> None:
        if not FLOWER_CHUNK_BYTES < self.max_request_bytes <= self.max_inflight_bytes:
            raise ValueError(f"max_request_bytes: expected above Flower's {FLOWER_CHUNK_BYTES:,}-byte array chunks "
                             f"and at most max_inflight_bytes ({self.max_inflight_bytes:,}), got "
                             f"{self.max_request_bytes:,}")
        for name in ("rate_per_s", "max_signature_age_s", "body_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: expected a positive number, got {value}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections: expected at least 1, got {self.max_connections}")

    @property
    def per_client_bytes(self) -> int:
        return 2 * self.max_request_bytes  # a site pushes two objects at once (Flower's MAX_CONCURRENT_OBJ_PUSHES)


class TokenBuckets:
    """One token bucket per client IP: ``rate`` tokens a second, at most ``burst`` saved."""

    MAX_CLIENTS = 4096  # forget full buckets beyond this many addresses

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str) -> bool:
        now = self.clock()
        tokens, last = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self.buckets) >= self.MAX_CLIENTS and client not in self.buckets:
            kept = {k: v for k, v in self.buckets.items() if v[0] + (now - v[1]) * self.rate < self.burst}
            if len(kept) >= self.MAX_CLIENTS // 2:  # many addresses, all busy: keep the most recent half
                kept = dict(sorted(kept.items(), key=lambda kv: kv[1][1])[-(self.MAX_CLIENTS // 2):])
            self.buckets = kept
        self.buckets[client] = (tokens - 1, now) if tokens >= 1 else (tokens, now)
        return tokens >= 1


class Budget:
    """Body bytes reserved by requests in flight, for the process and per client IP."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self.used, self.by_client = 0, {}

    def reserve(self, client: str, n: int) -> bool:
        mine = self.by_client.get(client, 0)
        if self.used + n > self.total or mine + n > self.per_client:
            return False
        self.used, self.by_client[client] = self.used + n, mine + n
        return True

    def release(self, client: str, n: int) -> None:
        self.used -= n
        left = self.by_client.get(client, 0) - n
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)


def client_key(host: str) -> str:
    """Who a request counts against: its IPv4 address, or its IPv6 /64 (one host holds a whole /64)."""
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        if address.version == 4:
            return str(address)
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


def signature_problem(headers: dict[bytes, bytes], max_age_s: float, now: datetime.datetime | None = None) -> str | None:
    """Why these node-auth headers are refused before the body is read (``None``: they may go on).

    The same check as Flower's ``authenticate_node`` (signature over the ISO timestamp with the
    key sent beside it) with a tighter window; whether the key is registered is asked separately.
    """
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature  # noqa: PLC0415

    if any(h not in headers for h in AUTH_HEADERS):
        return "unsigned request (node authentication is on)"
    try:
        stamp = headers[b"flwr-timestamp"].decode("ascii")
        age = ((now or datetime.datetime.now(tz=datetime.UTC)) - datetime.datetime.fromisoformat(stamp)).total_seconds()
        if not -CLOCK_SKEW_S < age < max_age_s:
            return f"signature dated {age:.1f} s ago; accepted: up to {max_age_s:g} s old, {CLOCK_SKEW_S:g} s ahead"
        key = b64decode(headers[b"flwr-public-key"], validate=True)
        if not verify_signature(bytes_to_public_key(key), stamp.encode("ascii"),
                                b64decode(headers[b"flwr-signature"], validate=True)):
            return "invalid signature"
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        return "malformed node-auth headers"
    except Exception:  # noqa: BLE001 - a key that does not load (cryptography's own errors)
        return "malformed node-auth headers"
    return None


async def _refuse(send: Send, status: int, detail: str) -> None:
    body = ('{"detail":"%s"}' % detail.replace('"', "'")).encode()  # noqa: UP031
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})


def guarded(app: ASGIApp, limits: PublicLimits,
            registered: Callable[[bytes], Awaitable[bool]] | None = None) -> ASGIApp:
    """``app`` behind the public listener's caps (module docstring); ``registered(public_key)``
    given means node authentication is on and Fleet requests are checked before their body."""
    buckets = TokenBuckets(limits.rate_per_s, 4 * limits.rate_per_s)
    budget = Budget(limits.max_inflight_bytes, limits.per_client_bytes)

    async def public(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        client = client_key((scope.get("client") or ("unknown", 0))[0])
        if not buckets.take(client):
            await _refuse(send, 503, f"more than {limits.rate_per_s:g} requests/s from {client}")
            return
        headers: dict[bytes, bytes] = {}
        for k, v in scope.get("headers", []):
            if k.lower() == b"content-length" and k.lower() in headers:
                await _refuse(send, 400, "more than one content-length")
                return
            headers[k.lower()] = v
        try:
            declared = int(headers[b"content-length"]) if b"content-length" in headers else None
        except ValueError:
            await _refuse(send, 400, "unreadable content-length")
            return
        if declared is not None and not 0 <= declared <= limits.max_request_bytes:
            await _refuse(send, 413, f"a request body may hold at most {limits.max_request_bytes:,} bytes")
            return
        if registered is not None and scope.get("path", "").startswith(FLEET_PREFIX):
            problem = signature_problem(headers, limits.max_signature_age_s)
            if problem is None and not await registered(b64decode(headers[b"flwr-public-key"])):
                problem = "this key is not registered"
            if problem is not None:
                await _refuse(send, 401, f"Invalid SuperNode authentication: {problem}")
                return
        if not budget.reserve(client, declared or 0):
            await _refuse(send, 503, "too many request bodies in flight; try again")
            return
        await _counted(app, scope, receive, send, limits, budget, client, declared or 0)

    return public


async def _counted(app: ASGIApp, scope: Scope, receive: Receive, send: Send, limits: PublicLimits,
                   budget: Budget, client: str, reserved: int) -> None:
    """Run ``app`` with its body counted against the caps; cut it (and drop the app's answer) past them."""
    state = {"got": 0, "reserved": reserved, "refused": None, "started": False, "complete": False}
    deadline = asyncio.get_running_loop().time() + limits.body_timeout_s

    async def counted_receive() -> dict:
        if state["refused"] is not None:
            return {"type": "http.disconnect"}
        if state["complete"]:  # the body is in: what follows is the app listening for a disconnect
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
        except TimeoutError:
            state["refused"] = (408, f"the body took longer than {limits.body_timeout_s:g} s")
            return {"type": "http.disconnect"}
        if message["type"] == "http.request":
            state["got"] += len(message.get("body", b""))
            extra = state["got"] - state["reserved"]
            if state["got"] > limits.max_request_bytes:
                state["refused"] = (413, f"a request body may hold at most {limits.max_request_bytes:,} bytes")
            elif extra > 0 and not budget.reserve(client, extra):
                state["refused"] = (503, "too many request bodies in flight; try again")
            elif extra > 0:
                state["reserved"] += extra
            if state["refused"] is not None:
                return {"type": "http.disconnect"}
            state["complete"] = not message.get("more_body", False)
        return message

    async def guarded_send(message: dict) -> None:
        if state["refused"] is not None:
            return  # the app's answer to a body it never fully got
        state["started"] = state["started"] or message["type"] == "http.response.start"
        await send(message)

    try:
        await app(scope, counted_receive, guarded_send)
    except Exception:
        if state["refused"] is None:
            raise
    finally:
        budget.release(client, state["reserved"])
    if state["refused"] is not None and not state["started"]:
        await _refuse(send, *state["refused"])
