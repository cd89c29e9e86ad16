"""What every route shares against abuse: body limit, rate limits, client addresses, and the
security headers on every response."""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 64 * 1024
RATE_LIMIT_ENV = "REFERRALS_RATE_LIMIT"
TRUSTED_PROXIES_ENV = "REFERRALS_TRUSTED_PROXIES"
DEFAULT_RATE_LIMIT = "10/minute"


class ApiError(BaseModel):
    field: str
    code: str
    message: str


class ApiRefusal(BaseModel):
    """The one shape of every refusal the API and the framework answer with."""

    detail: str
    errors: list[ApiError] = []
    # A refused duplicate: the referrer's copy of its signed `refused_duplicate` receipt
    # (docs/receipts.md), which cites the registration that came first.
    receipt: dict[str, Any] | None = None


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413), whether or not they say their length.

    The body is read here, up to the limit, before the app sees it: a route's own body
    parsing never has to tell "too large" from "malformed"."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _too_large(send)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(send: Send) -> None:
    refusal = ApiRefusal(
        detail="request body too large",
        errors=[
            ApiError(
                field="body",
                code="too_large",
                message=f"the request body must not exceed {MAX_BODY_BYTES} bytes",
            )
        ],
    )
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": refusal.model_dump_json().encode()})


_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60}
_RATE_UNITS |= {"h": 3600, "hr": 3600, "hour": 3600, "d": 86400, "day": 86400}


@dataclass(frozen=True)
class RateLimit:
    """`limit` submissions per `window` seconds, written as operators write rates: `10/minute`,
    `100/hour`, `3/10s`, or `off`."""

    limit: int
    window: float

    @classmethod
    def parse(cls, text: str) -> RateLimit | None:
        """None for `off`; a typo is an error at start-up, never a silently missing limit."""
        spec = text.strip().lower()
        if spec in ("off", "none", "unlimited"):
            return None
        found = re.fullmatch(r"(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?", spec)
        unit = _RATE_UNITS.get(found.group(3)) if found else None
        if found is None or unit is None or int(found.group(1)) < 1:
            raise ValueError(
                f"{RATE_LIMIT_ENV}: {text!r} is not a rate like 10/minute, 100/hour, 3/10s or off"
            )
        return cls(int(found.group(1)), int(found.group(2) or 1) * unit)


class RateLimiter:
    """A sliding-window log per client: at most `limit` attempts in any `window` seconds.

    In process, so every worker process of the web app has its own budget (run one process,
    or divide the limit). A lock, not the event loop, guards the log, so threads sharing an
    app are safe too. A refused attempt is not logged: a client that keeps hammering is let
    back in as soon as its oldest counted attempt leaves the window, not pushed back forever.
    """

    def __init__(
        self, limit: int, window: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._sweep_above = 1024
        self._swept_at = clock()

    @classmethod
    def from_setting(cls, setting: str) -> RateLimiter | None:
        rate = RateLimit.parse(setting)
        return cls(rate.limit, rate.window) if rate else None

    def hit(self, client: str) -> float | None:
        """Count one attempt by `client`: None if allowed, else the seconds until one is."""
        now = self._clock()
        with self._lock:
            hits = self._hits.setdefault(client, deque())
            while hits and hits[0] <= now - self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                return hits[0] + self.window - now
            hits.append(now)
            if len(self._hits) > self._sweep_above or now - self._swept_at >= self.window:
                self._sweep(now)
            return None

    def _sweep(self, now: float) -> None:
        """Forget clients with nothing left in the window, so memory follows the clients of
        the last window rather than every address ever seen. At most once a window, or when
        the table doubles: the cost per attempt stays constant on average."""
        stale = [c for c, hits in self._hits.items() if not hits or hits[-1] <= now - self.window]
        for client in stale:
            del self._hits[client]
        self._sweep_above = max(1024, 2 * len(self._hits))
        self._swept_at = now


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(setting: str | Iterable[str] | None) -> tuple[Network, ...]:
    """`192.0.2.10, 2001:db8::/32` (addresses or CIDR ranges); a typo fails at start-up."""
    if setting is None:
        return ()
    items = setting.split(",") if isinstance(setting, str) else setting
    try:
        return tuple(ipaddress.ip_network(i.strip(), strict=False) for i in items if i.strip())
    except ValueError as error:
        raise ValueError(f"{TRUSTED_PROXIES_ENV}: {error}") from error


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    ip = _ip(address)
    return ip is not None and any(ip in network for network in proxies)


def client_address(scope: Scope, proxies: tuple[Network, ...] = ()) -> str:
    """Who is asking, for rate limiting: the peer, unless the peer is a trusted proxy.

    Behind trusted proxies, `X-Forwarded-For` is read from the right: each proxy appends the
    address it received from, so the first untrusted address from the right is the one a
    trusted proxy saw; anything left of it was written by the client and may be forged.
    An IPv6 client counts as its /64, which one subscriber typically holds whole.
    """
    peer = scope.get("client")
    address = str(peer[0]) if peer else "unknown"
    if proxies and _trusted(address, proxies):
        forwarded = [
            value.decode("latin-1")
            for name, value in scope.get("headers") or []
            if name.lower() == b"x-forwarded-for"
        ]
        hops = [hop.strip() for hop in ",".join(forwarded).split(",") if hop.strip()]
        for hop in reversed(hops):
            address = hop
            if not _trusted(hop, proxies):
                break
    ip = _ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip) if ip is not None else address


# No script anywhere; style only from our own sheet; nothing may frame the pages.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
# The dev mailbox shows emails as they are sent, inline styles and all, in a sandboxed
# iframe (which inherits this policy); still no script.
DEV_MAIL_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)

# A chart is an SVG image that the charting library colours with its own <style> element;
# still no script, and it loads nothing.
CHART_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'none'; "
    "base-uri 'none'; frame-ancestors 'none'"
)


# A year, as browsers' preload lists ask; subdomains are the operator's to decide.
HSTS = "max-age=31536000"


def content_security_policy(path: str) -> str:
    if path.startswith("/dev/mail"):
        return DEV_MAIL_CONTENT_SECURITY_POLICY
    if path.startswith("/staff/charts/"):
        return CHART_CONTENT_SECURITY_POLICY
    return CONTENT_SECURITY_POLICY


class SecurityHeaders:
    """Every response, error pages and 413s included, says: run no script but ours (there is
    none), load nothing from elsewhere, never be framed, leak no referrer (status links are
    secrets), and do not guess content types. Served over https (`https`: the public URL
    is), it also tells browsers to never use plain http here again (HSTS), so a sign-in or a
    status link is never sent in clear by a mistyped address."""

    def __init__(self, app: ASGIApp, https: bool = False) -> None:
        self.app = app
        self.https = https

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = content_security_policy(str(scope.get("path", "")))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = policy
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Referrer-Policy"] = "no-referrer"
                headers["X-Frame-Options"] = "DENY"
                if self.https:
                    headers["Strict-Transport-Security"] = HSTS
            await send(message)

        await self.app(scope, receive, send_with_headers)
