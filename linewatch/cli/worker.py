"""``linewatch worker``: flags in, a :class:`~consumers.assembly.WorkerSetup` and a
:class:`~consumers.config.WorkerConfig` out; :mod:`consumers.assembly` builds the rest.

Defaults come from those two dataclasses, so each is written once.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from linewatch.cli._common import FMT, CliError, common_kafka, install_stop_signals, log, metrics_arg
from linewatch.cli.models import model_args, scorer_options


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


def add_commands(sub: Any) -> None:
    # consumers.config and consumers.assembly import no Kafka or torch at module level
    from consumers.assembly import FOLDER_DEFAULTS as f
    from consumers.assembly import WorkerSetup
    from consumers.config import WorkerConfig

    s, k = _defaults(WorkerSetup), _defaults(WorkerConfig)
    w = sub.add_parser("worker", formatter_class=FMT,
                       help="score frames as a member of a consumer group",
                       description="Consume PREFIX.frames as a member of a consumer group, score "
                                   "micro-batches few-shot against normal reference images (or "
                                   "zero-shot with --method mutual: no references), route "
                                   "to scores/alerts/review/deadletter, flush, then commit "
                                   "(at-least-once). SIGTERM finishes the batch in hand and exits.")
    common_kafka(w)
    w.add_argument("--group-id", default=k["group_id"], help="default: %(default)s")
    w.add_argument("--worker-id", default=None, help="default: HOSTNAME-PID")
    model_args(w, vocabulary=True)
    w.add_argument("--profile", metavar="PROFILE", default=None,
                   help="line profile from `linewatch calibrate` (references, thresholds, drift "
                        "reference, model options); reloaded without stopping when the file "
                        "changes. Replaces --references/--holdout/thresholds; a model flag that "
                        "contradicts the profile is an error")
    w.add_argument("--references", metavar="DIR",
                   help="folder of normal images of this line (the few shots)")
    w.add_argument("--shots", type=int, default=None,
                   help=f"how many reference images to use (default: {f['shots']}; not with --profile)")
    w.add_argument("--holdout", metavar="DIR",
                   help="other normal images (not the references): the thresholds are calibrated "
                        "from them unless both are given, and drift is measured against them")
    w.add_argument("--alert-threshold", type=float, default=None)
    w.add_argument("--review-threshold", type=float, default=None)
    w.add_argument("--false-alarm-rate", type=float, default=None,
                   help="target alert rate on normal frames when calibrating "
                        f"(default: {f['false_alarm_rate']}; not with --profile)")
    w.add_argument("--review-rate", type=float, default=None,
                   help="target rate of normal frames sent to review "
                        f"(default: {f['review_rate']}; not with --profile)")
    w.add_argument("--expected-anomaly-rate", type=float, default=None, metavar="RATE",
                   help="--method mutual (zero-shot): the most frames you expect to be defective, "
                        "e.g. 0.05; each camera's alert threshold is set from its own recent scores "
                        "so that no more than this share alert. Shown as UNCALIBRATED until "
                        "operators confirm enough normals for conformal thresholds (needs "
                        "LINEWATCH_LABEL_KEY) (default: "
                        f"{f['expected_anomaly_rate']})")
    w.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads for the model (default: torch's choice; set 1-2 per worker "
                        "when several workers share a machine)")
    w.add_argument("--max-batch", type=int, default=k["max_batch"],
                   help="frames per micro-batch (default: %(default)s)")
    w.add_argument("--max-wait-ms", type=int, default=k["max_wait_ms"],
                   help="longest wait to fill a batch after its first frame (default: %(default)s)")
    w.add_argument("--max-frame-bytes", type=int, default=k["max_frame_bytes"],
                   help="default: %(default)s")
    w.add_argument("--max-frame-pixels", type=int, default=k["max_pixels"], help="default: %(default)s")
    w.add_argument("--session-timeout-ms", type=int, default=k["session_timeout_ms"],
                   help="how long a dead worker keeps its partitions (default: %(default)s)")
    w.add_argument("--max-poll-interval-ms", type=int, default=k["max_poll_interval_ms"],
                   help="longest a batch may take before the group counts this worker as gone; "
                        "also how long a rebalance waits for a member that died during it "
                        "(default: %(default)s)")
    w.add_argument("--delivery-timeout-ms", type=int, default=k["delivery_timeout_ms"],
                   help="how long Kafka may take to acknowledge an output before the batch's "
                        "undelivered outputs are sent again (the batch stays uncommitted until "
                        "all are acknowledged) (default: %(default)s)")
    w.add_argument("--fetch-max-wait-ms", type=int, default=k["fetch_max_wait_ms"],
                   help="how long the broker may hold a fetch while no frame is there; low keeps "
                        "decisions fast. On the embedded broker with --data-dir use ~500: its "
                        "fetches from disk take longer, and a shorter wait returns nothing "
                        "(default: %(default)s)")
    w.add_argument("--max-cameras", type=int, default=k["max_cameras"],
                   help="cameras with their own metric series and drift window; frames of more "
                        "cameras are still scored and counted as camera=\"_other\" "
                        "(default: %(default)s)")
    w.add_argument("--camera-idle-s", type=float, default=k["camera_idle_s"], metavar="SECONDS",
                   help="forget a camera's series and drift window after this long without a "
                        "frame (its partition moved, or it stopped) (default: %(default)s)")
    w.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                   help="exit after this long without frames (batch jobs, tests)")
    w.add_argument("--drift-window", type=int, default=s["drift_window"], metavar="FRAMES",
                   help="frames per camera compared with the --holdout calibration frames for drift "
                        "(0 = no drift monitoring; default: %(default)s)")
    w.add_argument("--drift-threshold", action="append", default=[], metavar="STATISTIC=VALUE",
                   help="override one drift threshold, e.g. brightness=0.2 (repeatable). Statistics: "
                        "score_psi, score_ks, brightness, contrast, sharpness (relative changes), "
                        "colour_cast (CIELab units), embedding (cosine distance)")
    w.add_argument("--learn-from-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="add frames operators judged normal (PREFIX.labels) to the reference memory "
                        "and recalibrate thresholds on --holdout. Only labels signed with "
                        "LINEWATCH_LABEL_KEY (the review service's key) are applied (default: on "
                        "when LINEWATCH_LABEL_KEY is set, else off)")
    w.add_argument("--max-learned-normals", type=int, default=s["max_learned_normals"], metavar="N",
                   help="bound on learned normal frames; the oldest are evicted (default: %(default)s)")
    w.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    # tests and benchmarks only: make the model fail on purpose (inference/faults.py)
    w.add_argument("--inject-faults", default=None, metavar="SPEC", help=argparse.SUPPRESS)
    metrics_arg(w, 9108)
    w.set_defaults(run=cmd_worker)


def setup_from_args(a: argparse.Namespace):
    """The parsed flags as (WorkerSetup, WorkerConfig)."""
    from consumers.assembly import WorkerSetup
    from consumers.config import WorkerConfig, default_worker_id
    from linewatch.wire import Topics

    setup = WorkerSetup(
        scorer=scorer_options(a), profile=a.profile, device=a.device, references=a.references,
        holdout=a.holdout, alert_threshold=a.alert_threshold, shots=a.shots,
        false_alarm_rate=a.false_alarm_rate, review_rate=a.review_rate,
        review_threshold=a.review_threshold, drift_window=a.drift_window,
        drift_thresholds=tuple(a.drift_threshold), learn_from_labels=a.learn_from_labels,
        max_learned_normals=a.max_learned_normals, torch_threads=a.torch_threads,
        expected_anomaly_rate=a.expected_anomaly_rate,
        inject_faults=a.inject_faults)
    config = WorkerConfig(
        bootstrap=a.bootstrap_servers, topics=Topics(a.topic_prefix), group_id=a.group_id,
        worker_id=a.worker_id or default_worker_id(), max_batch=a.max_batch,
        max_wait_ms=a.max_wait_ms, max_frame_bytes=a.max_frame_bytes, max_pixels=a.max_frame_pixels,
        session_timeout_ms=a.session_timeout_ms,
        heartbeat_interval_ms=max(500, a.session_timeout_ms // 5),
        max_poll_interval_ms=a.max_poll_interval_ms, delivery_timeout_ms=a.delivery_timeout_ms,
        fetch_max_wait_ms=a.fetch_max_wait_ms, max_cameras=a.max_cameras,
        camera_idle_s=a.camera_idle_s, exit_when_idle_s=a.exit_when_idle, ready_file=a.ready_file)
    return setup, config


def cmd_worker(a: argparse.Namespace) -> int:
    from consumers.assembly import SetupError, build_worker
    from monitoring import metrics

    try:
        worker = build_worker(*setup_from_args(a))
    except SetupError as exc:
        raise CliError(str(exc)) from None
    if a.metrics_port is not None:
        metrics.serve(a.metrics_port, a.metrics_host)
    install_stop_signals(worker.request_stop)
    stats = worker.run()
    log.info("worker done: %s", stats)
    return 0
