"""Prometheus metrics for one server app.

Every series lives in this object's own `CollectorRegistry` (never prometheus_client's global
REGISTRY), so two apps in one process, or one per test, count separately.

    guardrail_requests_total{endpoint, tenant, action}     answered requests (cut streams too)
    guardrail_http_errors_total{endpoint, status}          refused or failed requests
    guardrail_streams_disconnected_total{endpoint}         streams whose client left before the end
    guardrail_risk{tenant}                                 histogram of assessed risk
    guardrail_stage_latency_seconds{stage}                 histogram per pipeline stage
    guardrail_batch_size                                   histogram of micro-batch sizes
    guardrail_queue_waiting                                requests waiting for the model
    guardrail_policy_reloads_total{ok}                     policy reloads (SIGHUP or admin)

`tenant` is a tenant listed in tenants.yaml, or `(unlisted)` for every other one: the tenant
header is the client's to choose, and a label per string it sends would grow /metrics without
bound (200 distinct 8 kB headers once grew it from 1.1 MB to 30 MB).
"""

from __future__ import annotations

from typing import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from guardrail.types import Request, Result

RISK_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
UNLISTED = "(unlisted)"


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, waiting: Callable[[], float] | None = None, listed: Callable[[str], bool] | None = None):
        self.registry = CollectorRegistry()
        self.listed = listed or (lambda tenant: False)  # is this tenant id listed (a label of its own)?
        r = self.registry
        self.requests = Counter("guardrail_requests", "Answered requests", ["endpoint", "tenant", "action"], registry=r)
        self.errors = Counter("guardrail_http_errors", "Refused or failed requests", ["endpoint", "status"], registry=r)
        self.disconnects = Counter(
            "guardrail_streams_disconnected", "Streams whose client left before the end", ["endpoint"], registry=r
        )
        self.risk = Histogram("guardrail_risk", "Assessed risk per tenant", ["tenant"], buckets=RISK_BUCKETS, registry=r)
        self.stage = Histogram(
            "guardrail_stage_latency_seconds", "Pipeline stage latency", ["stage"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch = Histogram("guardrail_batch_size", "Requests per micro-batch", buckets=BATCH_BUCKETS, registry=r)
        self.reloads = Counter("guardrail_policy_reloads", "Policy reloads", ["ok"], registry=r)
        self.waiting = Gauge("guardrail_queue_waiting", "Requests waiting for the model", registry=r)
        if waiting is not None:
            self.waiting.set_function(waiting)

    def tenant_label(self, tenant: str) -> str:
        return tenant if self.listed(tenant) else UNLISTED

    def observe(self, endpoint: str, result: Result) -> None:
        tenant = self.tenant_label(result.tenant)
        self.requests.labels(endpoint, tenant, result.action).inc()
        if result.risk is not None:
            self.risk.labels(tenant).observe(result.risk)
        for stage, ms in result.timings_ms.items():
            self.stage.labels(stage).observe(ms / 1000.0)

    def observe_batch(self, requests: Sequence[Request]) -> None:
        self.batch.observe(len(requests))

    def disconnected(self, endpoint: str) -> None:
        self.disconnects.labels(endpoint).inc()

    def error(self, endpoint: str, status: int) -> None:
        self.errors.labels(endpoint, str(status)).inc()

    def reload(self, ok: bool) -> None:
        self.reloads.labels(str(ok).lower()).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
