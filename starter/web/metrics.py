"""The web app's request metrics, for Prometheus, served on their own port
(REFERRALS_WEB_METRICS_PORT, host REFERRALS_METRICS_HOST or 127.0.0.1), never on the public app.

Requests are labelled by route *template* (`/status/{token}`), never by path: status and
sign-in links carry secrets. A request no route matches is `unmatched`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.metrics import MetricsEndpoint, MetricsSettingError

PORT_ENV = "REFERRALS_WEB_METRICS_PORT"
UNMATCHED = "unmatched"
access_log = logging.getLogger("referrals.web.access")
# The client went away before any response started (nginx's number for it).
CLIENT_CLOSED = "499"
# Any other method a client invents is counted as "other", so it cannot grow the label set.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Pages render in milliseconds; a submission waits for Temporal; up to the 10 s the app allows.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class WebMetrics:
    """The app's collectors, in a registry of their own (several apps may live in one process):

    - `referrals_web_requests_total{method, route, status}`: requests answered;
    - `referrals_web_request_duration_seconds{method, route}`: time to the end of the answer.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "referrals_web_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "referrals_web_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["method", "route"],
            buckets=BUCKETS,
            registry=self.registry,
        )

    def serve(self, port: int, host: str) -> str:
        """Serve these metrics, and the process's own (CPU, memory, GC), on host:port in a
        background thread; returns their URL."""
        disable_created_metrics()  # no `_created` twin of every series: half the scrape
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(collector)
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:  # the port is taken, or the host is not one of ours
            raise MetricsSettingError(f"metrics on {host}:{port}: {error}") from error
        return MetricsEndpoint(host, port).url


def route_template(routes: Sequence[BaseRoute], scope: Scope, request: Scope) -> str:
    """The template of the route that answered (or would answer) this request: the one routing
    noted in `scope`, else the first that matches `request` (the scope as it arrived, before a
    mount rewrote its root path)."""
    route = scope.get("route")
    if route is None:  # answered before routing (413), by a mount, or by no route
        partial = None
        for candidate in routes:
            match, _ = candidate.matches(request)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    if isinstance(route, Mount):  # static files: never the file's name
        return f"{path}/{{path}}"
    return path or "/"


class RequestMetrics:
    """ASGI middleware: counts, times and logs every HTTP request by method, route template and
    status. Added last, it is the outermost of the app's middleware and sees every answer,
    refusals (413, 429) included; an exception that escapes the app counts as a 500. This is
    the app's access log (`referrals.web.access`): a path can hold a status-link or sign-in
    token, so only the template is written."""

    def __init__(self, app: ASGIApp, metrics: WebMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = CLIENT_CLOSED
        request = {
            "type": "http",
            "path": scope.get("path", ""),
            "root_path": scope.get("root_path", ""),
            "method": scope.get("method", ""),
        }

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception:
            status = "500"
            raise
        finally:
            method = str(scope.get("method", "")).upper()
            method = method if method in METHODS else "other"
            route = route_template(self.routes, scope, request)
            self.metrics.requests.labels(method, route, status).inc()
            seconds = time.perf_counter() - started
            self.metrics.duration.labels(method, route).observe(seconds)
            access_log.info(
                "%s %s %s %.1f ms",
                method,
                route,
                status,
                seconds * 1000,
                extra={
                    "method": method,
                    "route": route,
                    "status": int(status),
                    "duration_ms": round(seconds * 1000, 1),
                },
            )
