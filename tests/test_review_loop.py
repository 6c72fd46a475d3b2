"""The loop closed, measured on the demo feed: operators mark the recurring false alarm (a
printed lot code the references lack) as normal, and the worker stops sending it to review.

Real processes throughout: the broker, a calibrated `linewatch worker` (DINOv2-S patch-knn,
learning from `.labels`), a `linewatch review` service; the operator is an HTTP client of
the review API that answers truthfully from the feed's ground truth.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from linewatch.broker import EmbeddedBroker, free_port
from linewatch.images import write_frames
from linewatch.wire import Topics
from tests.conftest import LABEL_KEY, collect
from tests.test_review import ReviewProc

REPO = Path(__file__).resolve().parent.parent


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    pattern = rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))


@pytest.mark.slow
def test_operator_verdicts_stop_a_recurring_false_alarm(broker: EmbeddedBroker, topics: Topics,
                                                        tmp_path: Path) -> None:
    from producers.producer import ProducerConfig, run_producer
    from producers.sources import SyntheticConveyor

    conveyor = SyntheticConveyor(seed=5, defect_rate=0.05, marking_rate=0.4)
    refs = write_frames(tmp_path / "refs", conveyor.normals(4))  # as the camera sends them: JPEG
    holdout = write_frames(tmp_path / "holdout", conveyor.normals(100, offset=20_000_000))
    m_port = free_port()
    cmd = [sys.executable, "-m", "linewatch", "worker", "--bootstrap-servers", broker.bootstrap,
           "--topic-prefix", topics.prefix, "--group-id", f"g-{uuid.uuid4().hex[:6]}",
           "--worker-id", "w-loop", "--references", str(refs), "--shots", "4", "--holdout", str(holdout),
           "--false-alarm-rate", "0.025", "--review-rate", "0.1", "--metrics-port", str(m_port),
           "--torch-threads", "2", "--session-timeout-ms", "6000", "--ready-file", str(tmp_path / "w.ready")]
    log = tmp_path / "worker.log"
    with open(log, "ab") as fh:
        worker = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                  env={**os.environ, "OMP_NUM_THREADS": "2",
                                       "LINEWATCH_LABEL_KEY": LABEL_KEY})
    review = ReviewProc(broker, topics, tmp_path / "review.db", tmp_path)
    metrics_url = f"http://127.0.0.1:{m_port}/metrics"
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "w.ready").exists():
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)

        def run_phase(first: int, count: int) -> dict:
            cfg = ProducerConfig(bootstrap=broker.bootstrap, topics=topics, camera="cam-loop",
                                 line="L", fps=0, max_frames=count, start_seq=first)
            frames = (conveyor.frame(i) for i in range(first, first + count))
            run_producer(cfg, frames, None)
            want = {("cam-loop", str(i)) for i in range(first, first + count)}
            tally = collect(broker, topics, lambda t: want <= t.accounted, timeout_s=300).tally
            out = {"review_items": len(tally.reviews)}
            for kind in ("lot-code", "plain"):
                idx = [i for i in range(first, first + count) if conveyor.frame(i).truth == "normal"
                       and conveyor.frame(i).name.endswith("lot-code") == (kind == "lot-code")]
                dec = [tally.scores[("cam-loop", str(i))].decision for i in idx]
                out[kind] = {"frames": len(idx), "review": dec.count("review") / len(idx),
                             "flagged": sum(d != "normal" for d in dec) / len(idx)}
            return out

        before = run_phase(0, 120)
        # every item of the phase is in the review store before the operator starts: otherwise
        # how many get answered would depend on how far the intake got (a loaded machine)
        review.wait_items(before["review_items"], timeout_s=120)
        # the operator works through the queue, answering from the feed's ground truth
        labelled = normal_verdicts = 0
        while True:
            item = json.loads(review.call("POST", "/api/claim", operator="lena")[1])["item"]
            if item is None:
                break
            truth = conveyor.frame(item["seq"]).truth
            body = ({"verdict": "normal"} if truth == "normal"
                    else {"verdict": "defect", "defect_type": "other"})
            assert review.call("POST", f"/api/items/{item['item_id']}/label", body, operator="lena")[0] == 200
            labelled += 1
            normal_verdicts += truth == "normal"
        assert normal_verdicts > 0, "no normal frame reached the review queue"
        deadline = time.monotonic() + 120  # learned, and thresholds recalibrated for them
        while _metric(metrics_url, "linewatch_learned_normals") < normal_verdicts:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        learned = _metric(metrics_url, "linewatch_learned_normals")
        after = run_phase(120, 120)
        print(f"\n{labelled} verdicts, {learned:.0f} normal frames learned")
        print(f"{'normal frames':<14}{'phase':<8}{'frames':>7}{'review':>8}{'flagged':>9}")
        for kind in ("lot-code", "plain"):
            for name, ph in (("before", before), ("after", after)):
                r = ph[kind]
                print(f"{kind:<14}{name:<8}{r['frames']:>7}{r['review']:>8.0%}{r['flagged']:>9.0%}")
        assert learned > 0
        lot_b, lot_a = before["lot-code"], after["lot-code"]
        plain_b, plain_a = before["plain"], after["plain"]
        assert lot_b["flagged"] > plain_b["flagged"] + 0.2, "the lot code was no false alarm"
        # learned: lot-coded parts are flagged at most half as often as before, and about as
        # often as plain parts (whose rate is the calibrated review budget)
        assert lot_a["flagged"] <= 0.5 * lot_b["flagged"], (before, after)
        assert lot_a["flagged"] <= plain_a["flagged"] + 0.1, (before, after)
        assert _metric(metrics_url, "linewatch_recalibrations_total") >= 1
    finally:
        review.stop()
        if worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=30)
