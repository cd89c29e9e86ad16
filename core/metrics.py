"""Metrics plumbing every process shares: where metrics are served (REFERRALS_METRICS_HOST,
REFERRALS_METRICS_PORT for the worker, 127.0.0.1 unless told otherwise) and the Temporal runtime
that serves the SDK's own metrics (`temporal_…`) there. The program's metrics (`referrals_…`)
are in activities/metrics.py; the web app's in starter/web/metrics.py.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from temporalio.runtime import Runtime

PORT_ENV = "REFERRALS_METRICS_PORT"
HOST_ENV = "REFERRALS_METRICS_HOST"


class MetricsSettingError(ValueError):
    """Metrics cannot be served where the settings say (the port is taken, the host is not
    one of this machine's)."""


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


def worker_runtime(endpoint: MetricsEndpoint) -> Runtime:
    """A Temporal runtime that serves Prometheus metrics on the endpoint for as long as the
    process lives. The SDK's metrics keep their default names (`temporal_…`, durations in
    milliseconds, counters without `_total`); the program's own are `referrals_…`. Clients
    connected with it, and their workers, report through it."""
    # Imported here: settings (every CLI command) name the endpoint without loading the SDK.
    from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

    config = PrometheusConfig(bind_address=endpoint.bind_address)
    try:
        return Runtime(telemetry=TelemetryConfig(metrics=config))
    except ValueError as error:  # the port is taken, or the address is not one of ours
        raise MetricsSettingError(f"metrics on {endpoint.bind_address}: {error}") from error
