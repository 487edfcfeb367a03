"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from memvp_ds.serve.engine import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("memvp_requests", "Chat completion requests, by outcome", ["outcome"], registry=r)
        self.errors = Counter("memvp_errors", "Refused or failed requests, by kind (the OpenAI error code)",
                              ["kind"], registry=r)
        self.queue_depth = Gauge("memvp_queue_depth", "Requests waiting for a row", registry=r)
        self.batch_rows = Gauge("memvp_batch_rows", "Rows decoded in the last step", registry=r)
        self.batch_size = Histogram("memvp_batch_size", "Rows decoded per step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.tokens = Counter("memvp_generated_tokens", "Tokens generated (rate() gives tokens/s)", registry=r)
        self.ttft = Histogram("memvp_time_to_first_token_seconds", "From submission to the first token",
                              registry=r)
        self.latency = Histogram("memvp_request_seconds", "From submission to the last token", registry=r)

    def engine_stats(self) -> EngineStats:
        def on_step(rows: int, queued: int, new_tokens: int) -> None:
            self.batch_rows.set(rows)
            self.batch_size.observe(rows)
            self.queue_depth.set(queued)
            self.tokens.inc(new_tokens)

        def on_finish(reason: str, seconds: float) -> None:
            self.latency.observe(seconds)
            self.requests.labels(outcome=reason).inc()

        return EngineStats(on_step=on_step, on_first_token=self.ttft.observe, on_finish=on_finish)

    def render(self) -> bytes:
        return generate_latest(self.registry)
