"""Worker processes for the fleet benchmarks (chaos, soak): start, signal, account for exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class WorkerProcess:
    """A `linewatch worker` subprocess, and whether its end was planned."""

    name: str
    proc: subprocess.Popen
    log: Path
    ready: Path
    metrics_url: str = ""
    planned: str | None = None  # "kill" or "stop" once we ended it on purpose
    started: float = field(default_factory=time.monotonic)

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready after {timeout_s:.0f}s")
            time.sleep(0.1)

    def kill(self) -> None:
        self.planned = "kill"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM: it must finish its batch, commit and exit 0."""
        self.planned = "stop"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode

    @property
    def unplanned_exit(self) -> str | None:
        """Why this worker's end counts against the fleet, if it does."""
        code = self.proc.poll()
        if code is None or self.planned == "kill":
            return None
        if self.planned == "stop" and code == 0:
            return None
        return f"{self.name} exited with {code}" + (" after SIGTERM" if self.planned else "")

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        return kb * 1024

    def metric(self, name: str, **labels: str) -> float:
        """Sum of this worker's samples ``name`` whose labels include ``labels`` (0 if gone)."""
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def start_worker(bootstrap: str, prefix: str, group: str, name: str, workdir: Path,
                 args: list[str], env: dict[str, str] | None = None) -> WorkerProcess:
    from linewatch.broker import free_port

    ready = workdir / f"{name}.ready"
    log = workdir / f"{name}.log"
    port = free_port()
    cmd = [sys.executable, "-m", "linewatch", "--log-level", "WARNING", "worker",
           "--bootstrap-servers", bootstrap, "--topic-prefix", prefix, "--group-id", group,
           "--worker-id", name, "--metrics-port", str(port), "--ready-file", str(ready), *args]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                                     "HF_HUB_OFFLINE": "1", **(env or {})})
    return WorkerProcess(name, proc, log, ready, f"http://127.0.0.1:{port}/metrics")
