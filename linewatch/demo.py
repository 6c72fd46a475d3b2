"""``linewatch demo``: the whole line on one machine, no Docker.

Embedded broker -> synthetic conveyor cameras -> worker processes in one consumer
group (with their metrics endpoints) -> the review page for borderline frames (whose verdicts the
worker learns from) -> a tally of everything the worker produced. The camera's
ground truth rides along in a header, so the summary can say how many frames
were lost or duplicated and how good the decisions were.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from linewatch.broker import EmbeddedBroker, create_topics, free_port, stop_process
from linewatch.images import write_frames
from linewatch.review.store import ReviewStore
from linewatch.tally import TallyReader
from linewatch.wire import LABEL_KEY_ENV, FrameMeta, Topics

log = logging.getLogger(__name__)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(proc: subprocess.Popen, ready: Path, log_path: Path, timeout_s: float,
                what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the {what} exited with code {proc.returncode} before it was "
                               f"ready. Its log ({log_path}) ends with:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the {what} was not ready after {timeout_s:.0f}s; see {log_path}")
        time.sleep(0.1)


PARTITIONS = 4  # of the demo's frames topic
CAMERA_SEQ_SPAN = 1_000_000  # camera k's frames are the belt's frames k * SPAN, k * SPAN + 1, ...
LAG_NOTE_FRAMES = 10  # frames waiting in Kafka above which the summary says what to do


def camera_names(n: int) -> list[str]:
    """``n`` camera ids whose frames land on different partitions, as many as there are.

    A frame's key is its camera id, so one camera's frames all go to one partition and are
    scored, in order, by one worker: the camera, not the frame, is the unit a consumer group
    shares out. Names are picked so the first cameras cover distinct partitions, or two
    cameras could hash to partitions that one worker owns and leave another idle."""
    from kafka.partitioner.default import murmur2

    names: list[str] = []
    i = 0
    while len(names) < n:
        i += 1
        name = f"demo-cam-{i}"
        want = len(names) % PARTITIONS
        if (murmur2(name.encode()) & 0x7FFFFFFF) % PARTITIONS == want:
            names.append(name)
    return names


@dataclass
class Worker:
    """One demo worker process: a member of the group ``linewatch-demo``."""

    name: str
    proc: subprocess.Popen
    ready: Path
    log: Path
    metrics_url: str

    @classmethod
    def start(cls, n: int, a: argparse.Namespace, bootstrap: str, workdir: Path, metrics_port: int,
              env: dict[str, str]) -> Worker:
        name = "worker" if n == 0 else f"worker-{n + 1}"
        ready, log_path = workdir / f"{name}.ready", workdir / f"{name}.log"
        cmd = [sys.executable, "-m", "linewatch", "worker", "--bootstrap-servers", bootstrap,
               "--false-alarm-rate", str(a.false_alarm_rate),
               "--metrics-port", str(metrics_port), "--ready-file", str(ready),
               "--group-id", "linewatch-demo", "--worker-id", f"demo-{name}"]
        if a.zero_shot:  # no references, no holdout: each camera scored by its own recent frames
            cmd += ["--method", "mutual", "--expected-anomaly-rate", str(expected_rate(a))]
        else:
            cmd += ["--references", str(workdir / "references"), "--shots", str(a.shots),
                    "--holdout", str(workdir / "holdout")]
        if a.workers > 1:  # the cores are shared: one torch thread each, not two fighting
            cmd += ["--torch-threads", str(max(1, (os.cpu_count() or 1) // a.workers))]
        with open(log_path, "ab") as wl:
            proc = subprocess.Popen(cmd, stdout=wl, stderr=subprocess.STDOUT, env=env)
        return cls(name, proc, ready, log_path, f"http://127.0.0.1:{metrics_port}/metrics")


def expected_rate(a: argparse.Namespace) -> float:
    """The zero-shot demo's stated maximum anomaly rate: as given, else the feed's defect rate."""
    return a.expected_anomaly_rate if a.expected_anomaly_rate is not None else a.defect_rate


class Backpressure:
    """The demo cameras wait while more than ``max_lag`` of their frames are undecided, so they
    run at the rate the workers sustain (at most ``--fps``) and a frame waits behind at most
    ``max_lag`` others. A real camera cannot wait: with ``max_lag`` 0 the demo's do not either,
    and frames queue in Kafka (``linewatch:consumer_lag_frames``)."""

    def __init__(self, max_lag: int, stop: threading.Event, stall_s: float = 120.0) -> None:
        self.max_lag, self.stop, self.stall_s = max_lag, stop, stall_s
        self.stalled = False  # the cameras gave up: nothing was decided for stall_s
        self._taken = 0  # frames the cameras took, over all cameras
        self._decided = 0
        self._cv = threading.Condition()

    def decided(self, n: int) -> None:
        """The main loop saw ``n`` of the cameras' frames decided (scored or dead-lettered)."""
        with self._cv:
            self._decided = n
            self._cv.notify_all()

    def wait_to_send(self) -> bool:
        """Before a camera takes a frame: False when the demo is stopping (or stalled)."""
        with self._cv:
            seen, since = self._decided, time.monotonic()
            while (self.max_lag > 0 and self._taken - self._decided >= self.max_lag + 1
                   and not self.stop.is_set() and not self.stalled):
                self._cv.wait(0.5)  # woken by decided(); the timeout only notices a stop
                if self._decided != seen:
                    seen, since = self._decided, time.monotonic()
                elif time.monotonic() - since > self.stall_s:
                    # nothing decided for minutes: stop the cameras and fail the demo, instead
                    # of waiting forever
                    self.stalled = True
            if self.stop.is_set() or self.stalled:
                return False
            self._taken += 1
            return True


def worker_steps(workers: list[Worker]) -> dict[str, float]:
    """Where the workers' time went: ms per frame received by step (all workers together), and
    ``frames_per_second``: each worker's frames over its busy time (every step but waiting
    for frames), summed over workers; comparable with ``python -m benchmarks.pipeline``.
    Empty if a worker's metrics cannot be read."""
    from monitoring.metrics import read_counters

    total: dict[str, float] = {}
    frames, rate = 0, 0.0
    try:
        for w in workers:
            counters = read_counters(w.metrics_url, timeout_s=5)  # one scrape per worker
            steps = counters.get("linewatch_worker_step_seconds", {})
            n = int(sum(counters.get("linewatch_frames_received", {}).values()))
            busy = sum(v for k, v in steps.items() if k != "poll")
            frames += n
            rate += n / busy if busy else 0.0
            for step, sec in steps.items():
                total[step] = total.get(step, 0.0) + sec
    except Exception as exc:  # the summary goes on without this part
        log.warning("could not read the workers' step times: %s: %s", type(exc).__name__, exc)
        return {}
    if not frames:
        return {}
    out = {k: round(1000 * v / frames, 2) for k, v in total.items()}
    out["frames_per_second"] = round(rate, 2)
    return out


def print_steps(ms: dict[str, float], fps: float, n_workers: int) -> None:
    who, whose = (("the worker", "the worker's") if n_workers == 1
                  else (f"the {n_workers} workers", f"the {n_workers} workers'"))
    print(f"where {whose} time went, ms per frame ('poll' is mostly waiting for frames):")
    print("  " + "  ".join(f"{k} {v:g}" for k, v in sorted(ms.items(), key=lambda kv: -kv[1])))
    print(f"{who} can score {fps:g} frames/s (frames over busy time; `python -m benchmarks.pipeline` "
          f"measures the same for a backlog)")


def print_table(summary: dict) -> None:
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, dict)]
    rows += [(f"latency_ms.{k}", v) for k, v in summary["latency_ms"].items()]
    rows += [(f"dead_letter.{k}", v) for k, v in summary["dead_letter_reasons"].items()]
    rows += [(f"operator_verdicts.{k}", v) for k, v in summary.get("operator_verdicts", {}).items()]
    rows += [(f"scored_by.{k}", v) for k, v in summary.get("frames_by_worker", {}).items()]
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 14))
    for k, v in rows:
        print(f"{k:<{width}}  {'-' if v is None else v}")
    print("-" * (width + 14))


def by_kind(scores: list, marked: Callable[[int], bool]) -> dict[str, dict[str, dict]]:
    """Alert and review rates per kind of frame, in the first and the last third of the run:
    the operator's verdicts on lot-coded parts should lower their rates in the last third."""
    seqs = sorted(s.seq % CAMERA_SEQ_SPAN for s in scores)  # the frame's index in its camera
    if len(seqs) < 3:
        return {}
    lo, hi = seqs[len(seqs) // 3], seqs[2 * len(seqs) // 3]
    out: dict[str, dict[str, dict]] = {}
    for phase, keep in (("first_third", lambda q: q < lo), ("last_third", lambda q: q >= hi)):
        for s in scores:
            if not keep(s.seq % CAMERA_SEQ_SPAN) or s.truth is None:
                continue
            kind = "defect" if s.truth == "defect" else "normal, lot code" if marked(s.seq) else "normal"
            row = out.setdefault(kind, {}).setdefault(phase, {"frames": 0, "alert": 0, "review": 0})
            row["frames"] += 1
            row[s.decision] = row.get(s.decision, 0) + 1
    for phases in out.values():
        for row in phases.values():
            row["alert_rate"] = round(row["alert"] / row["frames"], 3)
            row["flagged_rate"] = round((row["alert"] + row["review"]) / row["frames"], 3)
    return out


def print_zero_shot(z: dict) -> None:
    """The zero-shot line after its warm-up: what the issue's targets are measured on."""
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    modes = ", ".join(f"{m} {n}" for m, n in z["frames_by_mode"].items())
    print(f"zero-shot: frames by scoring mode: {modes}; decided by uncalibrated thresholds: "
          f"{z['uncalibrated_frames']}\n"
          f"after warm-up ({z['frames_after_warm_up']} frames, {z['defects_after_warm_up']} defects): "
          f"recall {pct(z['recall'])} (alert or review {pct(z['recall_alert_or_review'])}), "
          f"false-alarm rate {pct(z['false_alarm_rate'])}, normals sent to review "
          f"{pct(z['review_rate_normals'])}")


def print_by_kind(table: dict[str, dict[str, dict]]) -> None:
    print(f"{'kind of frame':<18} {'first third: alert / flagged':>30} {'last third: alert / flagged':>30}")
    for kind in ("normal", "normal, lot code", "defect"):
        if kind not in table:
            continue
        cells = []
        for phase in ("first_third", "last_third"):
            r = table[kind].get(phase)
            cells.append(f"{r['alert_rate']:.0%} / {r['flagged_rate']:.0%} of {r['frames']}" if r else "-")
        print(f"{kind:<18} {cells[0]:>30} {cells[1]:>30}")


def run_demo(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    from producers.producer import ProducerConfig, run_producer
    from producers.sources import SyntheticConveyor

    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="linewatch-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    conveyor = SyntheticConveyor(texture=a.texture, defect_rate=a.defect_rate, seed=a.seed,
                                 marking_rate=a.marking_rate)
    if not a.zero_shot:
        write_frames(workdir / "references", conveyor.normals(a.shots))
        write_frames(workdir / "holdout", conveyor.normals(a.holdout, offset=20_000_000))
    topics = Topics("linewatch")
    metrics_port = a.metrics_port or free_port()
    broker = EmbeddedBroker(port=a.broker_port or None, log_path=workdir / "broker.log").start()
    workers: list[Worker] = []
    review: subprocess.Popen | None = None
    stop = threading.Event()
    produced: set[tuple[str, str]] = set()
    reader: TallyReader | None = None
    try:
        create_topics(broker.bootstrap, topics, partitions=PARTITIONS)
        # the review service signs operators' verdicts with this key; the workers learn only
        # from labels signed with it
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               LABEL_KEY_ENV: os.environ.get(LABEL_KEY_ENV) or secrets.token_hex(32)}
        for n in range(a.workers):
            # more workers: more members of one consumer group, as on a real line
            port = metrics_port if n == 0 else free_port()
            workers.append(Worker.start(n, a, broker.bootstrap, workdir, port, env))
        review_port = a.review_port or free_port()
        review_db = f"sqlite:///{workdir / 'review.db'}"
        password = secrets.token_urlsafe(9)
        ReviewStore(review_db).add_operator("demo", password)
        review_log, review_ready = workdir / "review.log", workdir / "review.ready"
        with open(review_log, "ab") as rl:
            review = subprocess.Popen(
                [sys.executable, "-m", "linewatch", "review", "--bootstrap-servers", broker.bootstrap,
                 "--port", str(review_port), "--db", review_db, "--ready-file", str(review_ready)],
                stdout=rl, stderr=subprocess.STDOUT, env=env)
        rate = f"up to {a.fps:g} frames/s" if a.fps > 0 else "as fast as the workers take them"
        print(f"broker   {broker.bootstrap}\n"
              f"cameras  {', '.join(camera_names(a.cameras))} ({rate}"
              f"{f', waiting while more than {a.max_lag} frames are undecided' if a.max_lag else ''})\n"
              + "".join(f"metrics  {w.metrics_url}  ({w.name})\n" for w in workers)
              + f"review   http://127.0.0.1:{review_port}/  (sign in as demo, password {password})\n"
              f"workdir  {workdir} (references, holdout, worker*.log, review.log, broker.log)\n"
              + (f"zero-shot: no references and no held-out normals; each camera is scored by its "
                 f"own recent frames (mutual scoring), its first frames go to review (warm-up), then "
                 f"UNCALIBRATED thresholds from its own scores and an expected anomaly rate of "
                 f"{expected_rate(a):g}\nloading the model..." if a.zero_shot else
                 "loading the model and calibrating thresholds..."), flush=True)
        _wait_ready(review, review_ready, review_log, timeout_s=60, what="review service")
        operator = None
        if a.operator:
            from linewatch.demo_operator import SimulatedOperator

            def truth(seq: int) -> tuple[str, str | None]:
                f = conveyor.frame(seq)
                return (f.truth or "normal", f.name.rpartition(":")[2] if f.truth == "defect" else None)

            operator = SimulatedOperator(f"http://127.0.0.1:{review_port}", "demo", password, truth,
                                         stop, a.operator_delay)
            print(f"a simulated operator answers the review page from the feed's ground truth, "
                  f"{a.operator_delay:g} s after claiming each item (--no-operator: you do)", flush=True)
        for w in workers:
            _wait_ready(w.proc, w.ready, w.log, timeout_s=300, what=w.name)
        reader = TallyReader(broker.bootstrap, topics)

        def on_acked(meta: FrameMeta) -> None:  # on the producer's network thread: no blocking
            produced.add((meta.camera, str(meta.seq)))

        lag = Backpressure(a.max_lag, stop)
        cameras = camera_names(a.cameras)
        shares = [None] * a.cameras if a.frames is None else \
            [a.frames // a.cameras + (k < a.frames % a.cameras) for k in range(a.cameras)]
        camera_failed: list[BaseException] = []
        running = [a.cameras]
        running_lock = threading.Lock()
        done = threading.Event()

        def frames(k: int):
            # camera k films the belt from frame k * CAMERA_SEQ_SPAN on: its sequence numbers are
            # the belt's indices, so the ground truth of any (camera, seq) is conveyor.frame(seq)
            for i in itertools.count():
                if a.dim_after is not None and i == a.dim_after:
                    conveyor.brightness = 0.55  # the lamp dims: watch linewatch_drift in /metrics
                    log.info("frame %d of %s: the demo lamp dims to 55%%", i, cameras[k])
                if not lag.wait_to_send():
                    return
                yield conveyor.frame(k * CAMERA_SEQ_SPAN + i)

        def produce(k: int) -> None:
            cfg = ProducerConfig(bootstrap=broker.bootstrap, topics=topics, camera=cameras[k],
                                 line="demo-line", fps=a.fps, max_frames=shares[k],
                                 start_seq=k * CAMERA_SEQ_SPAN)
            try:
                run_producer(cfg, frames(k), stop, on_acked)
            except BaseException as exc:  # reported below: a demo must not end as if all went well
                camera_failed.append(exc)
                raise
            finally:
                with running_lock:
                    running[0] -= 1
                    if not running[0]:
                        done.set()

        t0 = time.monotonic()
        for k in range(a.cameras):
            threading.Thread(target=produce, args=(k,), name=cameras[k], daemon=True).start()
        if operator is not None:
            operator.start()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        # on a terminal the bar redraws in place; into a file or a pipe it writes a line at
        # most every 10 s instead of hundreds of carriage-returned updates
        bar = tqdm(total=a.frames, unit="frame", desc="scored", dynamic_ncols=True,
                   mininterval=0.2 if sys.stderr.isatty() else 10.0)
        max_lag = 0
        drain_deadline: float | None = None
        try:
            while True:
                reader.poll(200)
                t = reader.tally
                lag.decided(len(t.accounted))
                max_lag = max(max_lag, len(produced) - len(t.accounted))
                bar.set_postfix(sent=len(produced), alerts=len(t.alerts), review=len(t.reviews),
                                dead=len(t.dead), refresh=False)
                bar.update(len(t.accounted) - bar.n)  # redraws at most every mininterval
                if done.is_set():
                    # a frame's alert or review record travels on its own topic and can be
                    # read after its score: the summary waits for both
                    if produced <= t.accounted and not t.unrouted:
                        break
                    drain_deadline = drain_deadline or time.monotonic() + 60
                    if time.monotonic() > drain_deadline:
                        log.error("60s after the camera stopped: %d frames not accounted for, %d "
                                  "scored frames without their alert or review record",
                                  len(produced - t.accounted), len(t.unrouted))
                        break
                if exited := [w for w in workers if w.proc.poll() is not None]:
                    log.error("%s exited (code %s):\n%s", exited[0].name, exited[0].proc.returncode,
                              _tail(exited[0].log))
                    break
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
        elapsed = time.monotonic() - t0
        summary = reader.tally.summary(produced, elapsed)
        summary["camera_fps"] = round(len(produced) / elapsed, 3) if elapsed else 0.0
        summary["frames_by_worker"] = dict(sorted(collections.Counter(
            s.worker for s in reader.tally.scores.values()).items()))
        summary["max_lag_frames"] = max_lag
        steps = worker_steps(workers)
        if steps:
            summary["worker_frames_per_second"] = steps.pop("frames_per_second")
            summary["worker_ms_per_frame"] = steps
        if operator is not None:
            summary["operator_verdicts"] = {"normal": operator.answered.normal,
                                            "defect": operator.answered.defect}
        print_table(summary)
        if "worker_ms_per_frame" in summary:
            print_steps(summary["worker_ms_per_frame"], summary["worker_frames_per_second"], len(workers))
        summary["by_kind"] = by_kind(list(reader.tally.scores.values()), conveyor.marked)
        if lag.stalled:
            log.error("the camera stopped: no frame was decided for %.0f s", lag.stall_s)
            return 1
        if summary["by_kind"]:
            print_by_kind(summary["by_kind"])
        if "zero_shot" in summary:
            print_zero_shot(summary["zero_shot"])
        if max_lag > LAG_NOTE_FRAMES:
            more = (f"add a worker by starting another `linewatch worker` with the same "
                    f"--group-id (here: --workers {len(workers) + 1})" if a.cameras > len(workers)
                    else "more workers help only with more cameras than workers (a camera's frames "
                         "are scored in order by one worker): a faster worker (a GPU, --precision "
                         "int8) or a lower frame rate")
            print(f"the cameras outpaced the workers: up to {max_lag} frames waited in Kafka. On a "
                  f"real line linewatch:consumer_lag_frames shows this and LinewatchConsumerLagGrowing "
                  f"fires if it keeps growing; {more}")
        if a.json:
            Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
            print(f"summary written to {a.json}")
        if camera_failed:
            log.error("the demo camera failed (%s: %s): the run ended early",
                      type(camera_failed[0]).__name__, camera_failed[0])
            return 1
        return 0 if summary["frames_lost"] == 0 else 1
    finally:
        stop.set()
        if reader is not None:
            reader.close()
        for proc in [w.proc for w in workers] + [review]:
            stop_process(proc)
        broker.stop()
