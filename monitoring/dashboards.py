"""The Grafana dashboards, as data: ``python -m monitoring.dashboards`` writes the JSON files.

Grafana provisions dashboards from JSON files (``monitoring/grafana/dashboards``),
and ``linewatch grafana push`` uploads the same files. Hand-editing four large
JSON documents invites drift between panels and metric names, so they are
generated from the short descriptions below; a test fails when the files are
not what this module generates, and another runs every panel's query against a
real Prometheus scraping a running worker.

Every query uses ``$__rate_interval`` and the ``line``/``camera`` variables; the
data source is a variable too, so the same JSON works under provisioning and
when pushed to an existing Grafana whose Prometheus has another uid.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).resolve().parent / "grafana" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
LC = 'line=~"$line",camera=~"$camera"'
RI = "$__rate_interval"


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend)
    kind: str = "timeseries"
    unit: str = "short"
    description: str = ""
    width: int = 12
    height: int = 8
    thresholds: list[tuple[float, str]] = field(default_factory=list)
    max: float | None = None


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel]
    camera_var: bool = True


def _variables(camera: bool) -> list[dict[str, Any]]:
    def query_var(name: str, q: str) -> dict[str, Any]:
        return {"name": name, "label": name, "type": "query", "datasource": DS,
                "definition": q, "query": {"query": q, "refId": f"{name}-values"},
                "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}

    out = [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0},
           query_var("line", "label_values(linewatch_frames_scored_total, line)")]
    if camera:
        out.append(query_var("camera",
                             'label_values(linewatch_frames_scored_total{line=~"$line"}, camera)'))
    return out


def _panel(p: Panel, pid: int, x: int, y: int) -> dict[str, Any]:
    steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in p.thresholds]
    defaults: dict[str, Any] = {"unit": p.unit, "thresholds": {"mode": "absolute", "steps": steps}}
    if p.max is not None:
        defaults["max"] = p.max
    if p.thresholds and p.kind == "timeseries":
        defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
    out: dict[str, Any] = {
        "id": pid, "type": p.kind, "title": p.title, "description": p.description,
        "datasource": DS, "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": [{"datasource": DS, "refId": chr(ord("A") + i), "expr": e, "legendFormat": leg,
                     **({"format": "heatmap"} if p.kind == "heatmap" else {})}
                    for i, (e, leg) in enumerate(p.exprs)],
    }
    if p.kind == "table":
        out["targets"] = [{**t, "format": "table", "instant": True} for t in out["targets"]]
    return out


def render(d: Dashboard) -> dict[str, Any]:
    panels, x, y, row_h = [], 0, 0, 0
    for i, p in enumerate(d.panels, start=1):
        if x + p.width > 24:
            x, y, row_h = 0, y + row_h, 0
        panels.append(_panel(p, i, x, y))
        x += p.width
        row_h = max(row_h, p.height)
    return {
        "uid": d.uid, "title": d.title, "description": d.description, "tags": ["linewatch"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"}, "timezone": "",
        "templating": {"list": _variables(d.camera_var)}, "annotations": {"list": []},
        "links": [{"title": "linewatch", "type": "dashboards", "tags": ["linewatch"], "asDropdown": True}],
        "panels": panels,
    }


DASHBOARDS = [
    Dashboard("linewatch-line-overview", "linewatch / Line overview",
              "What the line is doing now: decisions, alerts and review load per camera.", [
        Panel("Frames scored per second", [(f"sum(rate(linewatch_frames_scored_total{{{LC}}}[{RI}]))", "frames/s")],
              kind="stat", unit="short", width=6, height=5),
        Panel("Alert share", [(f'sum(rate(linewatch_frames_scored_total{{{LC},decision="alert"}}[{RI}])) / '
                               f"sum(rate(linewatch_frames_scored_total{{{LC}}}[{RI}]))", "alerts")],
              kind="stat", unit="percentunit", width=6, height=5, thresholds=[(0.05, "orange"), (0.2, "red")]),
        Panel("Review share", [(f'sum(rate(linewatch_frames_scored_total{{{LC},decision="review"}}[{RI}])) / '
                                f"sum(rate(linewatch_frames_scored_total{{{LC}}}[{RI}]))", "review")],
              kind="stat", unit="percentunit", width=6, height=5, thresholds=[(0.15, "orange")]),
        Panel("Cameras drifting", [(f"count(abs(linewatch_drift{{{LC}}}) > linewatch_drift_threshold) "
                                    f"or vector(0)", "statistics over threshold")],
              kind="stat", width=6, height=5, thresholds=[(1, "orange")],
              description="Drift statistics above their threshold right now (0 = the line looks "
                          "like calibration)."),
        Panel("Decisions per second", [(f"sum by (decision) (rate(linewatch_frames_scored_total{{{LC}}}[{RI}]))",
                                        "{{decision}}")], unit="short"),
        Panel("Alerts per camera", [(f"sum by (line, camera) (rate(linewatch_alerts_total{{{LC}}}[{RI}]))",
                                     "{{line}}/{{camera}}")], unit="short"),
        Panel("Review items per camera", [(f"sum by (line, camera) (rate(linewatch_review_items_total{{{LC}}}[{RI}]))",
                                           "{{line}}/{{camera}}")], unit="short"),
        Panel("Alerts firing", [('ALERTS{alertstate="firing",line=~"$line"}', "{{alertname}} {{camera}}")],
              kind="table", description="Prometheus alerts for this line (Alertmanager routes them)."),
    ], camera_var=True),
    Dashboard("linewatch-camera-detail", "linewatch / Camera detail",
              "One camera: score distribution against its thresholds, latency, image statistics.", [
        Panel("Anomaly score distribution", [(f"sum by (le) (rate(linewatch_anomaly_score_bucket{{{LC}}}[{RI}]))",
                                              "{{le}}")], kind="heatmap", width=12),
        Panel("Anomaly score p50 / p95 and thresholds", [
            (f"histogram_quantile(0.5, sum by (le) (rate(linewatch_anomaly_score_bucket{{{LC}}}[{RI}])))", "p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(linewatch_anomaly_score_bucket{{{LC}}}[{RI}])))", "p95"),
            ("max by (kind) (linewatch_threshold)", "{{kind}} threshold")], width=12),
        Panel("Capture-to-decision latency", [
            (f"histogram_quantile(0.5, sum by (le) (rate(linewatch_end_to_end_latency_seconds_bucket{{{LC}}}[{RI}])))", "p50"),
            (f"histogram_quantile(0.95, sum by (le) (rate(linewatch_end_to_end_latency_seconds_bucket{{{LC}}}[{RI}])))", "p95")],
              unit="s", thresholds=[(2.0, "red")], description="The objective is p95 under 2 s."),
        Panel("Brightness and contrast vs calibration", [
            (f'linewatch_image_quality{{{LC},statistic=~"brightness|contrast"}}', "{{camera}} {{statistic}}"),
            ('linewatch_image_quality_reference{statistic=~"brightness|contrast"}', "calibration {{statistic}}")],
              unit="short", description="Mean luma and luma standard deviation (0-255)."),
        Panel("Sharpness vs calibration", [
            (f'linewatch_image_quality{{{LC},statistic="sharpness"}}', "{{camera}}"),
            ('linewatch_image_quality_reference{statistic="sharpness"}', "calibration")],
              description="Laplacian variance over luma variance; falls when the lens is dirty or out of focus, not when the light dims."),
        Panel("Colour (CIELab chroma) vs calibration", [
            (f'linewatch_image_quality{{{LC},statistic=~"chroma_a|chroma_b"}}', "{{camera}} {{statistic}}"),
            ('linewatch_image_quality_reference{statistic=~"chroma_a|chroma_b"}', "calibration {{statistic}}")]),
    ]),
    Dashboard("linewatch-model-health", "linewatch / Model health and drift",
              "Is the line still the line the thresholds were calibrated on?", [
        Panel("Drift, as a fraction of its threshold", [
            (f"abs(linewatch_drift{{{LC}}}) / linewatch_drift_threshold", "{{camera}} {{statistic}}")],
              unit="percentunit", width=24, thresholds=[(1.0, "red")],
              description="Above 100% a drift alert starts its hold time."),
        Panel("Score distribution drift (PSI, KS)", [
            (f'linewatch_drift{{{LC},statistic=~"score_psi|score_ks"}}', "{{camera}} {{statistic}}")]),
        Panel("Image quality drift (relative change)", [
            (f'linewatch_drift{{{LC},statistic=~"brightness|contrast|sharpness"}}', "{{camera}} {{statistic}}")],
              unit="percentunit"),
        Panel("Embedding drift (cosine distance)", [
            (f'linewatch_drift{{{LC},statistic="embedding"}}', "{{camera}}"),
            (f'linewatch_drift_threshold{{{LC},statistic="embedding"}}', "{{camera}} threshold")]),
        Panel("Frames in the drift window", [(f"linewatch_drift_window_frames{{{LC}}}", "{{camera}}")]),
        Panel("Reference images per worker", [("linewatch_reference_images", "{{worker}}")], kind="stat",
              width=8, height=5),
        Panel("Thresholds", [("linewatch_threshold", "{{worker}} {{kind}}")], kind="stat", width=8, height=5),
        Panel("Models and profiles", [("linewatch_worker_info", "")], kind="table", width=8, height=5,
              description="Scorer, backbone, software version and profile fingerprint of each worker."),
    ], camera_var=True),
    Dashboard("linewatch-pipeline-health", "linewatch / Pipeline health",
              "Kafka in, decisions out: throughput, lag, latency, dead letters, workers.", [
        Panel("Workers up", [('sum(up{job="linewatch-worker"})', "workers")], kind="stat", width=6,
              height=5, thresholds=[]),
        Panel("Consumer lag (frames)", [("sum(linewatch:consumer_lag_frames:sum)", "frames behind")],
              kind="stat", width=6, height=5, thresholds=[(50, "orange"), (500, "red")],
              description="Frames producers had acknowledged minus frames workers committed."),
        Panel("Dead-letter share", [("linewatch:dead_letter_ratio:rate5m", "dead letters")], kind="stat",
              unit="percentunit", width=6, height=5, thresholds=[(0.01, "red")]),
        Panel("Offset commit failures", [(f"sum(rate(linewatch_offset_commit_failures_total[{RI}]))", "failures/s")],
              kind="stat", width=6, height=5, thresholds=[(0.001, "orange")]),
        Panel("Frames in and out", [
            (f"sum(rate(linewatch_producer_frames_total[{RI}]))", "produced"),
            (f"sum(rate(linewatch_frames_received_total[{RI}]))", "received by workers"),
            (f"sum(rate(linewatch_frames_scored_total[{RI}]))", "scored")]),
        Panel("Consumer lag per partition", [("linewatch:consumer_lag_frames:partition",
                                              "{{topic}}[{{partition}}]")]),
        Panel("Model time per micro-batch", [
            (f"histogram_quantile(0.95, sum by (le, worker) (rate(linewatch_scoring_seconds_bucket[{RI}])))",
             "p95 {{worker}}")], unit="s"),
        Panel("Frames per micro-batch", [
            (f"sum by (worker) (rate(linewatch_batch_size_frames_sum[{RI}])) / "
             f"sum by (worker) (rate(linewatch_batch_size_frames_count[{RI}]))", "{{worker}}")]),
        Panel("Dead letters by reason", [(f"sum by (reason) (rate(linewatch_dead_letters_total[{RI}]))",
                                          "{{reason}}")]),
        Panel("Model up, outputs blocked", [
            ("min by (worker) (linewatch_model_up)", "model up {{worker}}"),
            ("max by (worker, topic) (linewatch_output_blocked)", "blocked {{worker}} {{topic}}")],
              description="Model up 0: it fails even on a reference image, frames wait uncommitted. "
                          "Blocked 1: a topic refuses the worker's outputs. Neither drops a frame."),
        Panel("Dead letters: bad input vs failed", [
            (f"sum by (cause) (rate(linewatch_dead_letters_total[{RI}]))", "{{cause}}")],
              description="failed: valid frames the model crashed on, alone and repeatedly."),
        Panel("Output delivery retries and producer send errors", [
            (f"sum by (worker) (rate(linewatch_output_delivery_retries_total[{RI}]))", "retries {{worker}}"),
            (f"sum by (camera) (rate(linewatch_producer_send_errors_total[{RI}]))", "send errors {{camera}}")]),
    ], camera_var=False),
]


def generate() -> dict[str, dict[str, Any]]:
    """File name -> dashboard JSON."""
    return {f"{d.uid}.json": render(d) for d in DASHBOARDS}


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m monitoring.dashboards",
                                 description="Write the Grafana dashboard JSON files.")
    ap.add_argument("--out", type=Path, default=DASHBOARD_DIR, help="default: %(default)s")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, doc in generate().items():
        (a.out / name).write_text(dumps(doc))
        print(a.out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
