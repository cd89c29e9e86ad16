"""Metrics plumbing every process shares: where metrics are served (REFERRALS_METRICS_HOST,
REFERRALS_METRICS_PORT for the worker, 127.0.0.1 unless told otherwise) and the Temporal runtime
that serves the SDK's own metrics (`temporal_…`) there. The program's metrics (`referrals_…`)
are in activities/metrics.py; the web app's in starter/web/metrics.py.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

PORT_ENV = "REFERRALS_METRICS_PORT"
HOST_ENV = "REFERRALS_METRICS_HOST"
REFRESH_ENV = "REFERRALS_METRICS_REFRESH_S"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_REFRESH_S = 15.0

log = logging.getLogger(__name__)


class MetricsSettingError(ValueError):
    """REFERRALS_METRICS_* holds something the worker cannot serve metrics on."""


@dataclass(frozen=True)
class MetricsEndpoint:
    host: str
    port: int

    @property
    def bind_address(self) -> str:
        """`ip:port` as Temporal's exporter wants it (an IP, not a name; IPv6 in brackets)."""
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            try:
                address = ipaddress.ip_address(socket.gethostbyname(self.host))
            except OSError as error:
                raise MetricsSettingError(f"{HOST_ENV}={self.host!r}: {error}") from error
        if address.version == 6:
            return f"[{address}]:{self.port}"
        return f"{address}:{self.port}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


def port_setting(value: str | None, variable: str) -> int | None:
    """A metrics port from the environment: None when unset, empty or "off"."""
    value = (value or "").strip()
    if not value or value.lower() == "off":
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise MetricsSettingError(f"{variable}={value!r}: a port number (1-65535) or 'off'")
    return int(value)


def metrics_host(environ: Mapping[str, str] | None = None) -> str:
    """REFERRALS_METRICS_HOST, where the worker and the web app serve metrics: loopback
    unless told otherwise."""
    env = os.environ if environ is None else environ
    return env.get(HOST_ENV, "").strip() or DEFAULT_HOST


def metrics_endpoint(environ: Mapping[str, str] | None = None) -> MetricsEndpoint | None:
    """Where the worker serves its metrics, from REFERRALS_METRICS_PORT / _HOST; None: nowhere."""
    env = os.environ if environ is None else environ
    port = port_setting(env.get(PORT_ENV), PORT_ENV)
    if port is None:
        return None
    return MetricsEndpoint(host=metrics_host(env), port=port)


def refresh_interval(environ: Mapping[str, str] | None = None) -> float:
    env = os.environ if environ is None else environ
    value = env.get(REFRESH_ENV, "").strip()
    if not value:
        return DEFAULT_REFRESH_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise MetricsSettingError(f"{REFRESH_ENV}={value!r}: a number of seconds above 0")
    return seconds


def worker_runtime(port: int, host: str | None = None) -> Runtime:
    """A Temporal runtime that serves Prometheus metrics on host:port (host default
    REFERRALS_METRICS_HOST, else 127.0.0.1) for as long as the process lives. The SDK's metrics
    keep their default names (`temporal_…`, durations in milliseconds, counters without
    `_total`); the program's own are `referrals_…`. Clients connected with it, and their
    workers, report through it."""
    endpoint = MetricsEndpoint(host=host or metrics_host(), port=port)
    config = PrometheusConfig(bind_address=endpoint.bind_address)
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=config))
    except ValueError as error:  # the port is taken, or the address is not one of ours
        raise MetricsSettingError(f"metrics on {endpoint.bind_address}: {error}") from error
