"""Soak benchmark: does a worker's memory stay flat over 100,000 frames?

One worker (a cheap scorer: the pipeline is what runs for days, not the model)
consumes small synthetic frames from several cameras on the embedded broker;
its resident memory (VmRSS) is sampled every 10,000 frames it has scored. It
prints the samples, the slope (a least-squares fit, MB per 10,000 frames) and
the ratio of the last sample to the first, and writes them as JSON.

    python -m benchmarks.soak --json benchmarks/results/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from benchmarks._fleet import start_worker
from linewatch.broker import EmbeddedBroker, create_topics
from linewatch.wire import FrameMeta, Topics


def _feed(bootstrap: str, topics: Topics, frames: int, cameras: int, stop: threading.Event,
          ahead_of: Callable[[], int], max_ahead: int) -> None:
    """Send ``frames`` small frames, never more than ``max_ahead`` beyond what was scored
    (so the soak measures the worker, not a broker backlog)."""
    from kafka import KafkaProducer

    rng = np.random.default_rng(0)
    images = [cv2.imencode(".jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))[1].tobytes()
              for _ in range(16)]
    p = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, enable_idempotence=False)
    for i in range(frames):
        while i - ahead_of() > max_ahead and not stop.is_set():
            time.sleep(0.05)
        if stop.is_set():
            break
        cam = f"cam-{i % cameras}"
        meta = FrameMeta(camera=cam, line="soak", seq=i, capture_ns=time.time_ns(), encoding="jpeg",
                         width=64, height=64)
        p.send(topics.frames, key=meta.key, value=images[i % len(images)], headers=meta.headers())
    p.flush(timeout=60)
    p.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--every", type=int, default=10_000, help="sample RSS every N scored frames")
    ap.add_argument("--cameras", type=int, default=8)
    ap.add_argument("--scorer", default="noop", choices=["noop", "patch-knn"],
                    help="noop (default: the pipeline alone) or patch-knn on EfficientNet-Lite0 at 64 px")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="linewatch-soak-"))
    refs = workdir / "refs"
    refs.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        cv2.imwrite(str(refs / f"{i}.png"), rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    topics = Topics("soak")
    samples: list[dict] = []
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        create_topics(broker.bootstrap, topics, partitions=4)
        args = ["--scorer", a.scorer, "--references", str(refs), "--alert-threshold", "0.9",
                "--review-threshold", "0.8", "--max-batch", "32", "--max-wait-ms", "200",
                "--torch-threads", "1"]
        if a.scorer == "patch-knn":
            args += ["--backbone", "efficientnet-lite0", "--image-size", "64"]
        w = start_worker(broker.bootstrap, topics.prefix, "soak", "soak", workdir, args)
        w.wait_ready()
        scored = lambda: int(w.metric("linewatch_frames_scored_total"))  # noqa: E731
        stop = threading.Event()
        feeder = threading.Thread(target=_feed, args=(broker.bootstrap, topics, a.frames, a.cameras,
                                                       stop, scored, 5000), daemon=True)
        t0 = time.monotonic()
        feeder.start()
        next_at = a.every
        try:
            while next_at <= a.frames:
                n = scored()
                if n >= next_at:
                    samples.append({"frames": n, "rss_mb": round(w.rss_bytes() / 2**20, 1),
                                    "elapsed_s": round(time.monotonic() - t0, 1)})
                    print(f"{n:>8} frames  RSS {samples[-1]['rss_mb']:7.1f} MB  "
                          f"({samples[-1]['elapsed_s']:.0f}s)", flush=True)
                    next_at += a.every
                if w.proc.poll() is not None:
                    raise RuntimeError(f"the worker exited:\n{w.log.read_text()[-2000:]}")
                time.sleep(0.5)
        finally:
            stop.set()
            w.stop()
    x = np.array([s["frames"] for s in samples], float)
    y = np.array([s["rss_mb"] for s in samples], float)
    slope = float(np.polyfit(x, y, 1)[0] * 10_000) if len(x) > 1 else 0.0  # MB per 10k frames
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
              "scorer": a.scorer, "frames": a.frames, "samples": samples,
              "slope_mb_per_10k_frames": round(slope, 3),
              "rss_last_over_first": round(float(y[-1] / y[0]), 4) if len(y) else None,
              "frames_per_second": round(x[-1] / samples[-1]["elapsed_s"], 1) if len(x) else None}
    print(f"\nslope {result['slope_mb_per_10k_frames']} MB per 10,000 frames; RSS after "
          f"{int(x[-1])} frames is {100 * result['rss_last_over_first']:.1f}% of RSS after {int(x[0])}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
