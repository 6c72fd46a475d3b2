"""``linewatch produce`` from a video file and from a dataset folder, into a real broker.

Camera devices and RTSP/HTTP streams go through the same OpenCV VideoCapture
path as the video file; a live device or stream is not available here.
"""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
from conftest import REPO, shared_data
from kafka import KafkaConsumer

from linewatch.wire import FrameMeta


def _frames(broker, topic: str, n: int) -> list:
    c = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=10000, max_partition_fetch_bytes=16 * 1024 * 1024)
    out = []
    for rec in c:
        out.append(rec)
        if len(out) >= n:
            break
    c.close()
    return out


def _produce(broker, topics, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linewatch", "produce", "--bootstrap-servers",
                           broker.bootstrap, "--topic-prefix", topics.prefix, "--fps", "0", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_produce_from_video_file(broker, topics, tmp_path):
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    assert writer.isOpened(), "this OpenCV build cannot write MJPG/AVI"
    for i in range(12):
        writer.write(np.full((120, 160, 3), 20 * i, np.uint8))
    writer.release()
    r = _produce(broker, topics, "--source", str(video), "--camera", "vid", "--start-seq", "100")
    assert r.returncode == 0, r.stderr
    assert "sent 12 frames" in r.stdout
    recs = _frames(broker, topics.frames, 12)
    metas = sorted((FrameMeta.from_headers(r.headers) for r in recs), key=lambda m: m.seq)
    assert [m.seq for m in metas] == list(range(100, 112))
    assert {(m.camera, m.width, m.height, m.truth) for m in metas} == {("vid", 160, 120, None)}
    assert all(r.key == b"vid" for r in recs)


def test_produce_from_mvtec_folder_carries_truth(broker, topics):
    root = shared_data("mvtec_ad", "bottle", "test")
    r = _produce(broker, topics, "--source", str(root.parent), "--frames", "300", "--camera", "b")
    assert r.returncode == 0, r.stderr
    n = 209 + 83  # train/good + test images; masks under ground_truth are not frames
    recs = _frames(broker, topics.frames, n)
    truths = [FrameMeta.from_headers(r.headers).truth for r in recs]
    assert len(recs) == n
    assert truths.count("defect") == 63 and truths.count("normal") == 229


def test_produce_refuses_frames_over_the_limit(broker, topics, tmp_path):
    r = _produce(broker, topics, "--source", "synthetic", "--frames", "3", "--max-frame-bytes", "1000")
    assert r.returncode == 0
    assert "rejected 3" in r.stdout and "over the limit of 1000" in r.stderr
