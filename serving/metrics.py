"""Metrics a platform team scrapes, exported through Ray's metrics agent in Prometheus format.

Ray serves every node's metrics at `http://NODE:METRICS_EXPORT_PORT/metrics` (`ray start --metrics-export-port`;
`ray.nodes()[i]["MetricsExportPort"]` tells a local one). Names get Ray's `ray_` prefix there, and Serve adds
the `application`, `deployment` and `replica` tags to each:

| metric | type | tags | what |
|---|---|---|---|
| `ray_lidit_image_requests_total` | counter | `status`, `model_version` | image requests answered, by HTTP status |
| `ray_lidit_request_latency_seconds` | histogram | `status` | admission to answer, at the ingress |
| `ray_lidit_images_generated_total` | counter | `model_version` | images returned |
| `ray_lidit_inflight_requests` | gauge | | requests admitted by this ingress replica and not answered (queue depth) |
| `ray_lidit_batch_queue_depth` | gauge | | items waiting for the next encoder / generator batch |
| `ray_lidit_batch_size` | histogram | | requests per encoder / generator batch |
| `ray_lidit_model_version_info` | gauge | `model_version` | 1 for the version this ingress replica serves, 0 for one it served before |

Serve's own metrics (`ray_serve_*`: replica counts, handle queues, HTTP latency per route) sit beside them.
"""

from __future__ import annotations

LATENCY_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]


class IngressMetrics:
    """The ingress replica's request metrics (one instance per replica)."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "lidit_image_requests",
            "image generation requests by status",
            tag_keys=("status", "model_version"),
        )
        self.latency = Histogram(
            "lidit_request_latency_seconds",
            "image request latency at the ingress",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("status",),
        )
        self.images = Counter("lidit_images_generated", "images returned", tag_keys=("model_version",))
        self._inflight = Gauge("lidit_inflight_requests", "requests admitted and not yet answered")
        self._version = Gauge(
            "lidit_model_version_info", "1 for the served model version", tag_keys=("model_version",)
        )
        self._inflight_now = 0
        self._versions: dict[str, int] = {}

    def _gauges(self) -> None:
        # Seen on Ray 2.60: a worker exports only the gauge values recorded since its previous export once
        # anything else is recorded, so a gauge set once vanishes from /metrics. Re-record them all each time.
        self._inflight.set(self._inflight_now)
        for version, value in self._versions.items():
            self._version.set(value, tags={"model_version": version})

    def answered(self, status: int, seconds: float, version: str = "") -> None:
        self.requests.inc(tags={"status": str(status), "model_version": version})
        self.latency.observe(seconds, tags={"status": str(status)})
        self._gauges()

    def inflight(self, n: int) -> None:
        self._inflight_now = n
        self._gauges()

    def serving(self, version: str) -> None:
        """The version gauge: 1 for `version`, 0 for those served before."""
        self._versions = dict.fromkeys(self._versions, 0) | {version: 1}
        self._gauges()


class BatchMetrics:
    """Batch sizes and the queue in front of one deployment's batch worker."""

    def __init__(self) -> None:
        from ray.serve.metrics import Gauge, Histogram

        self._size = Histogram("lidit_batch_size", "requests per model batch", boundaries=BATCH_BOUNDARIES)
        self._queue_depth = Gauge("lidit_batch_queue_depth", "items waiting for the next model batch")

    def batch(self, size: int, waiting: int) -> None:
        """A batch of `size` started, `waiting` items left behind it (both recorded together, see above)."""
        if size:
            self._size.observe(size)
        self._queue_depth.set(waiting)
