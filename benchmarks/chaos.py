"""Chaos benchmark: a fleet under scripted faults loses no frame and no worker crashes.

A stream from several cameras goes through a consumer group of workers on the
embedded broker with durable storage, while a script injects, at fixed shares of
the stream: poison records on ``.frames`` (every dead-letter reason, including
frames that crash the model), on ``.labels`` and on ``.review``; three worker
SIGKILLs (each replaced); a scale-out and a scale-in (SIGTERM, which must exit
0); a broker kill -9 and restart on the same data. The workers' models also
fail transiently on purpose (``--inject-faults fail_every=...``).

It then accounts for every frame Kafka acknowledged: scored, or dead-lettered
with a reason; **lost** is neither (must be 0). Duplicates (a frame scored
twice) are attributed to the fault they followed and must each be marked
``maybe_duplicate`` by the worker that re-scored it. **Unplanned exits** are
worker or review-service exits the script did not cause (must be 0).

    python -m benchmarks.chaos --quick --json out.json     # under 10 minutes on 2 cores
    python -m benchmarks.chaos --json benchmarks/results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import cv2

from benchmarks._fleet import REPO, WorkerProcess, start_worker
from benchmarks.poison import POISON_CAMERA, bad_frames, bad_labels, bad_review_items
from linewatch.broker import EmbeddedBroker, create_topics, free_port
from linewatch.tally import TallyReader
from linewatch.wire import LABEL_KEY_ENV, Topics
from producers.producer import ProducerConfig, run_producer
from producers.sources import SyntheticConveyor

MAX_BATCH = 8
MAX_FRAME_BYTES = 256 * 1024
FRAME_SIZE = 192  # the smallest the synthetic defects fit in
MODEL_SIZE = 128


def _send(bootstrap: str, topic: str, records: list[tuple[bytes, list | None]], key: bytes) -> None:
    """Send and make sure every record was acknowledged (the embedded broker's durable storage
    sometimes refuses a write that lost a race: send those again)."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=False,
                      max_request_size=MAX_FRAME_BYTES * 4)
    left = list(records)
    for _ in range(20):
        futures = [(r, p.send(topic, key=key, value=r[0], headers=r[1])) for r in left]
        p.flush(timeout=60)
        left = [r for r, f in futures if not (f.is_done and f.succeeded())]
        if not left:
            break
        time.sleep(0.5)
    p.close()
    if left:
        raise RuntimeError(f"{len(left)} poison records not accepted by the broker")


class Chaos:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.workdir = Path(a.workdir or tempfile.mkdtemp(prefix="linewatch-chaos-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key = secrets.token_hex(32)
        self.topics = Topics("chaos")
        self.group = f"chaos-{secrets.token_hex(3)}"
        self.broker = EmbeddedBroker(data_dir=self.workdir / "broker-data",
                                     log_path=self.workdir / "broker.log")
        self.workers: list[WorkerProcess] = []
        self.acked: set[tuple[str, str]] = set()
        self.poison_expect: dict[int, str] = {}
        self.faults: list[dict] = []
        self.t0 = time.monotonic()
        self.review: subprocess.Popen | None = None
        self._n = 0

    # -- the fleet ---------------------------------------------------------------------------
    def _worker_args(self) -> list[str]:
        refs, hold = self.workdir / "refs", self.workdir / "holdout"
        if not refs.exists():
            conveyor = SyntheticConveyor(seed=3, defect_rate=0.0, size=(FRAME_SIZE, FRAME_SIZE))
            for folder, ims in ((refs, conveyor.normals(4)), (hold, conveyor.normals(30, 20_000_000))):
                folder.mkdir()
                for i, im in enumerate(ims):
                    cv2.imwrite(str(folder / f"{i}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        return ["--backbone", "efficientnet-lite0", "--image-size", str(MODEL_SIZE),
                "--references", str(refs), "--holdout", str(hold), "--false-alarm-rate", "0.05",
                "--torch-threads", "1", "--max-batch", str(MAX_BATCH), "--max-frame-bytes",
                str(MAX_FRAME_BYTES), "--session-timeout-ms", "6000", "--max-poll-interval-ms",
                "20000", "--inject-faults", "fail_every=97,poison=255:0:255", "--learn-from-labels",
                "--fetch-max-wait-ms", "500"]  # durable storage: fetches take longer than 50 ms

    def add_worker(self) -> WorkerProcess:
        self._n += 1
        w = start_worker(self.broker.bootstrap, self.topics.prefix, self.group, f"w{self._n}",
                         self.workdir, self._worker_args(), env={LABEL_KEY_ENV: self.key})
        self.workers.append(w)
        return w

    def live(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.planned is None and w.proc.poll() is None]

    def fault(self, name: str, action) -> None:
        at = time.monotonic() - self.t0
        print(f"  {at:6.1f}s  {name}", flush=True)
        action()
        self.faults.append({"fault": name, "at_s": round(at, 1), "at_ns": time.time_ns()})

    def start_review(self) -> None:
        from linewatch.review.store import ReviewStore

        db = f"sqlite:///{self.workdir / 'review.db'}"
        ReviewStore(db).add_operator("chaos", secrets.token_urlsafe(12))
        self.review = subprocess.Popen(
            [sys.executable, "-m", "linewatch", "review", "--bootstrap-servers", self.broker.bootstrap,
             "--topic-prefix", self.topics.prefix, "--port", str(free_port()), "--db", db],
            stdout=open(self.workdir / "review.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            cwd=REPO, env={**os.environ, LABEL_KEY_ENV: self.key})

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.a
        self.broker.start()
        create_topics(self.broker.bootstrap, self.topics, partitions=a.partitions)
        self.start_review()
        for _ in range(2):
            self.add_worker()
        for w in self.workers:
            w.wait_ready()
        print(f"2 workers ready ({time.monotonic() - self.t0:.0f}s); streaming {a.frames} frames from "
              f"{a.cameras} cameras at {a.fps} frames/s each", flush=True)
        per_cam = a.frames // a.cameras
        done = threading.Event()
        produced = Counter()

        def camera(i: int) -> None:
            cfg = ProducerConfig(bootstrap=self.broker.bootstrap, topics=self.topics, camera=f"cam-{i}",
                                 line="chaos", fps=a.fps, max_frames=per_cam, start_seq=0,
                                 max_frame_bytes=MAX_FRAME_BYTES)
            conveyor = SyntheticConveyor(seed=i, defect_rate=0.05, size=(FRAME_SIZE, FRAME_SIZE))

            def acked(m) -> None:
                self.acked.add((m.camera, str(m.seq)))
                produced[i] += 1

            run_producer(cfg, iter(conveyor), done, acked)

        cams = [threading.Thread(target=camera, args=(i,), daemon=True) for i in range(a.cameras)]
        for t in cams:
            t.start()
        script = [
            (0.08, "poison: 50 bad frames on .frames", self._poison_frames),
            (0.12, "poison: 50 bad records on .labels", self._poison_labels),
            (0.16, "poison: 50 bad records on .review", self._poison_review),
            (0.22, "SIGKILL a worker (replaced)", self._kill_one),
            (0.34, "scale-out: a third worker", self._scale_out),
            (0.46, "SIGKILL a worker (replaced)", self._kill_one),
            (0.58, "broker kill -9 and restart", self._broker_restart),
            (0.70, "scale-in: SIGTERM a worker", self._scale_in),
            (0.82, "SIGKILL a worker (replaced)", self._kill_one),
        ]
        total = per_cam * a.cameras
        for share, name, action in script:
            while sum(produced.values()) < share * total and any(t.is_alive() for t in cams):
                time.sleep(0.2)
            self.fault(name, action)
        for t in cams:
            t.join()
        print(f"stream done ({time.monotonic() - self.t0:.0f}s); waiting for every frame", flush=True)
        expected = self.acked | {(POISON_CAMERA, str(s)) for s in self.poison_expect}
        reader = TallyReader(self.broker.bootstrap, self.topics)
        deadline = time.monotonic() + a.drain_timeout
        while not expected <= reader.tally.accounted and time.monotonic() < deadline:
            reader.poll(500)
        reader.poll(2000)  # late duplicates, if any
        tally = reader.tally
        reader.close()
        rejected_labels = max((w.metric("linewatch_records_rejected_total", reader="worker-labels")
                               for w in self.live()), default=0.0)
        exits = [w.stop() for w in self.live()]
        result = self._result(tally, expected, rejected_labels)
        result["final_worker_exit_codes"] = exits
        return result

    # -- faults ------------------------------------------------------------------------------
    def _poison_frames(self) -> None:
        records, expect = bad_frames(1_000_000, 50, MAX_FRAME_BYTES, 40_000_000, FRAME_SIZE)
        self.poison_expect.update(expect)
        _send(self.broker.bootstrap, self.topics.frames, records, POISON_CAMERA.encode())

    def _poison_labels(self) -> None:
        _send(self.broker.bootstrap, self.topics.labels,
              [(v, None) for v in bad_labels(50, self.key.encode())], POISON_CAMERA.encode())

    def _poison_review(self) -> None:
        _send(self.broker.bootstrap, self.topics.review,
              [(v, None) for v in bad_review_items(50)], POISON_CAMERA.encode())

    def _kill_one(self) -> None:
        victim = max(self.live(), key=lambda w: w.started)  # the newest: it may be mid-rebalance
        victim.kill()
        self.add_worker().wait_ready()

    def _scale_out(self) -> None:
        self.add_worker().wait_ready()

    def _scale_in(self) -> None:
        self.live()[0].stop()

    def _broker_restart(self) -> None:
        self.broker.kill()
        self.broker.restart()

    # -- the account -------------------------------------------------------------------------
    def _result(self, tally, expected: set, rejected_labels: float) -> dict:
        lost = sorted(expected - tally.accounted)
        wrong_reason = {seq: (tally.dead[(POISON_CAMERA, str(seq))].reason, want)
                        for seq, want in self.poison_expect.items()
                        if (POISON_CAMERA, str(seq)) in tally.dead
                        and tally.dead[(POISON_CAMERA, str(seq))].reason != want}
        per_fault = []
        for i, f in enumerate(self.faults):
            end = self.faults[i + 1]["at_ns"] if i + 1 < len(self.faults) else float("inf")
            n = sum(f["at_ns"] <= t < end for t in tally.duplicate_times_ns)
            per_fault.append({"fault": f["fault"], "at_s": f["at_s"], "duplicates": n})
        before = sum(t < self.faults[0]["at_ns"] for t in tally.duplicate_times_ns) if self.faults else 0
        unplanned = [u for w in self.workers if (u := w.unplanned_exit)]
        if self.review is not None and self.review.poll() is not None:
            unplanned.append(f"review service exited with {self.review.returncode}")
        reasons = Counter(dl.reason for dl in tally.dead.values())
        return {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "frames_streamed": len(self.acked), "cameras": self.a.cameras,
            "poison_frames": len(self.poison_expect),
            "produced": len(expected),
            "scored": len(tally.scores),
            "dead_lettered": dict(sorted(reasons.items())),
            "dead_lettered_bad_input": sum(dl.cause == "bad_input" for dl in tally.dead.values()),
            "dead_lettered_failed": sum(dl.cause == "failed" for dl in tally.dead.values()),
            "poison_frames_with_wrong_reason": wrong_reason,
            "lost": len(lost), "lost_examples": lost[:10],
            "duplicates": tally.duplicates, "unmarked_duplicates": len(tally.unmarked_duplicates),
            "duplicates_before_first_fault": before,
            "input_duplicates": tally.input_duplicates, "output_copies": tally.output_copies,
            "max_batch": MAX_BATCH, "faults": per_fault,
            "labels_rejected_by_a_worker": rejected_labels,
            "unplanned_exits": len(unplanned), "unplanned_exit_details": unplanned,
            "workers_started": len(self.workers),
            "elapsed_s": round(time.monotonic() - self.t0, 1),
        }

    def close(self) -> None:
        for w in self.workers:
            if w.proc.poll() is None:
                w.proc.kill()
        if self.review is not None and self.review.poll() is None:
            self.review.terminate()
            self.review.wait(30)
        self.broker.stop()


def table(r: dict) -> str:
    lines = [f"{'produced (acknowledged frames + poison frames)':<48} {r['produced']}",
             f"{'scored':<48} {r['scored']}",
             f"{'dead-lettered, bad input':<48} {r['dead_lettered_bad_input']}",
             f"{'dead-lettered, model failed on the frame alone':<48} {r['dead_lettered_failed']}",
             f"{'LOST':<48} {r['lost']}",
             f"{'duplicates (unmarked)':<48} {r['duplicates']} ({r['unmarked_duplicates']})",
             f"{'input duplicates / output copies':<48} {r['input_duplicates']} / {r['output_copies']}",
             f"{'UNPLANNED EXITS':<48} {r['unplanned_exits']}",
             f"{'labels refused by a worker':<48} {r['labels_rejected_by_a_worker']:.0f}",
             "", f"{'fault':<40} {'at':>7} {'duplicates':>11}"]
    lines += [f"{f['fault']:<40} {f['at_s']:>6.0f}s {f['duplicates']:>11}" for f in r["faults"]]
    lines += ["", "dead letters by reason: " + ", ".join(f"{k} {v}" for k, v in r["dead_lettered"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="5,000 frames (under 10 minutes on 2 cores)")
    ap.add_argument("--frames", type=int, default=None, help="frames in all (default 20,000; quick 5,000)")
    ap.add_argument("--cameras", type=int, default=12)
    ap.add_argument("--fps", type=float, default=4.0, help="per camera (default: %(default)s)")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--drain-timeout", type=float, default=300.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="write the result as JSON")
    a = ap.parse_args(argv)
    a.frames = a.frames or (5000 if a.quick else 20000)
    chaos = Chaos(a)
    logging.basicConfig(filename=chaos.workdir / "chaos.log", level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"workdir {chaos.workdir} (chaos.log, broker.log, w*.log, review.log)", flush=True)
    try:
        result = chaos.run()
    finally:
        chaos.close()
    result["command"] = "python -m benchmarks.chaos " + " ".join(argv if argv is not None else sys.argv[1:])
    print("\n" + table(result))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {a.json}")
    return 0 if result["lost"] == 0 and result["unplanned_exits"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
