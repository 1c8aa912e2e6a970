"""Prometheus metrics of the gateway, through Ray Serve's metrics API (exported by every Ray
node's metrics agent, next to Ray Serve's own request/latency/queue metrics)."""

from __future__ import annotations


class ServeMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("aero_requests", description="requests by model and HTTP status",
                                        tag_keys=("model", "status"))
        self.rejections = metrics.Counter("aero_rejections", description="requests refused for overload",
                                          tag_keys=("model", "reason"))
        self.ttft = metrics.Histogram("aero_time_to_first_token_s", description="seconds to the first token",
                                      boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10], tag_keys=("model",))
        self.tokens = metrics.Counter("aero_generated_tokens", description="completion tokens", tag_keys=("model",))
        self.tokens_per_s = metrics.Histogram("aero_tokens_per_s", description="per-request output tokens/s",
                                              boundaries=[1, 5, 10, 25, 50, 100, 250, 500], tag_keys=("model",))
        self.queue = metrics.Gauge("aero_engine_queue", description="sequences waiting or decoding",
                                   tag_keys=("model",))
