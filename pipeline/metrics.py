"""Metrics: ray.util.metrics inside tasks (scraped from Ray's metrics port), a Pushgateway summary from the
driver at the end of a run (only when a Pushgateway is configured; nothing is pushed otherwise).

    perfusion_concepts_total{status}         training attempts finished, by status   (tasks)
    perfusion_training_steps_total           optimizer steps run                     (tasks)
    perfusion_training_seconds               seconds per concept (histogram)         (tasks)
    perfusion_batch_job_*                    a run's summary, job=perfusion-batch-train or
                                             perfusion-batch-render, catalog=<name>,
                                             schedule=<name> for scheduled runs       (Pushgateway)
        _duration_seconds, _last_run_timestamp_seconds, _last_success_timestamp_seconds,
        _concepts{status} (train) or _images{status} (render)
deploy/monitoring/alerts.yaml alerts on these names (tests/deploy checks that they agree).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.index import ConceptRow

PUSHGATEWAY_ENV = "PERFUSION_BATCH_PUSHGATEWAY"
_TASK_METRICS: dict[str, Any] = {}


def record_task(row: ConceptRow) -> None:
    """Count one finished training attempt (inside a Ray task; a no-op outside Ray)."""
    try:
        from ray.util import metrics
    except ImportError:  # pragma: no cover - ray is a dependency
        return
    if not _TASK_METRICS:
        _TASK_METRICS["concepts"] = metrics.Counter(
            "perfusion_concepts_total", description="Concept training attempts finished.", tag_keys=("status",)
        )
        _TASK_METRICS["steps"] = metrics.Counter("perfusion_training_steps_total", description="Optimizer steps run.")
        _TASK_METRICS["seconds"] = metrics.Histogram(
            "perfusion_training_seconds",
            description="Seconds to train one concept.",
            boundaries=[10, 30, 60, 120, 300, 600, 1200],
        )
    _TASK_METRICS["concepts"].inc(1, tags={"status": str(row.status)})
    if row.steps:
        _TASK_METRICS["steps"].inc(float(row.steps))
    if row.seconds:
        _TASK_METRICS["seconds"].observe(float(row.seconds))


def push_summary(
    gateway: str,
    job: str,
    catalog: str,
    counts: dict[str, int],
    seconds: float,
    ok: bool,
    unit: str = "concepts",
    schedule: str | None = None,
) -> None:
    """Push the run summary (duration, `unit` by status, last success time) under job=`job`, grouped by
    catalog and, for a scheduled run, schedule: an ad-hoc run never refreshes a schedule's success time."""
    from prometheus_client import CollectorRegistry, Gauge, pushadd_to_gateway

    registry = CollectorRegistry()
    duration = Gauge("perfusion_batch_job_duration_seconds", "Wall time of the last run.", registry=registry)
    duration.set(seconds)
    by_status = Gauge(
        f"perfusion_batch_job_{unit}", f"{unit.capitalize()} in the last run, by status.", ["status"], registry=registry
    )
    for status, count in counts.items():
        by_status.labels(status=status).set(count)
    finished = Gauge("perfusion_batch_job_last_run_timestamp_seconds", "When the last run ended.", registry=registry)
    finished.set(time.time())
    if ok:
        success = Gauge(
            "perfusion_batch_job_last_success_timestamp_seconds",
            "When the last run without failures ended.",
            registry=registry,
        )
        success.set(time.time())
    # pushadd (POST): replaces only the metrics pushed now, so a failed run keeps the last success time.
    grouping = {"catalog": catalog} | ({"schedule": schedule} if schedule else {})
    pushadd_to_gateway(gateway, job=job, registry=registry, grouping_key=grouping)
