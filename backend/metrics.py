"""Prometheus metrics of one app instance (own registry, so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["BackendMetrics", "CONTENT_TYPE_LATEST"]


class BackendMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.embeddings_computed = Counter(
            "vlm_al_embeddings_computed", "Image embeddings computed by the backbone (cache misses)", registry=r
        )
        self.weak_labels_computed = Counter(
            "vlm_al_weak_labels_computed", "Coarse labels asked of the weak annotator (cache misses)", registry=r
        )
        self.forward_images = Counter(
            "vlm_al_model_forward_images",
            "Images put through a model's forward pass, by model (the embedding pass, and any weak annotator's own)",
            ["model"],
            registry=r,
        )
        self.images_downloaded = Counter("vlm_al_images_downloaded", "Task images downloaded", registry=r)
        self.image_errors = Counter(
            "vlm_al_image_errors", "Task images that could not be used (missing, foreign, unreadable)", registry=r
        )
        self.predictions = Counter("vlm_al_predictions", "Predictions returned by /predict", registry=r)
        self.predictions_pushed = Counter(
            "vlm_al_predictions_pushed", "Predictions created in Label Studio by bulk import", registry=r
        )
        self.fits = Counter("vlm_al_fits", "Fit jobs by outcome", ["outcome"], registry=r)
        self.jobs_failed = Counter("vlm_al_jobs_failed", "Background jobs that raised", ["kind"], registry=r)
        self.job_seconds = Histogram(
            "vlm_al_job_seconds",
            "Background job duration",
            ["kind"],
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.webhooks = Counter("vlm_al_webhooks", "Webhook events by action and outcome", ["action", "outcome"], registry=r)
        self.request_seconds = Histogram(
            "vlm_al_request_seconds",
            "HTTP request duration by endpoint",
            ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.model_version = Gauge(
            "vlm_al_model_version_number", "Number N of the served model version vlm-al-vN", ["project"], registry=r
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
