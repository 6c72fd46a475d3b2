"""Line profiles in a running worker: load at start, reload when the file changes.

A reload must not drop or stall frames: the new scorer is built and fitted in a
background thread while the worker keeps scoring with the old one, and the swap
happens between two micro-batches, so every frame is scored by exactly one
complete profile (the score message records which thresholds applied).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.calibration import Thresholds
from inference.profile import LineProfile, ProfileError
from monitoring.drift import DriftMonitor, DriftReference

log = logging.getLogger(__name__)


@dataclass
class LoadedProfile:
    scorer: Any
    thresholds: Thresholds
    references: list[np.ndarray]
    drift: DriftMonitor | None
    fingerprint: str
    profile: LineProfile
    describe: Callable[[np.ndarray], str] | None = None  # defect words, set by the worker's builder
    info: dict[str, str] | None = None  # model labels of linewatch_worker_info, likewise


def load_profile(path: str | Path, device: str = "cpu", drift_window: int = 100,
                 drift_thresholds: Mapping[str, float] | None = None,
                 preloaded: tuple[LineProfile, str | None] | None = None) -> LoadedProfile:
    """Build and fit the scorer a profile describes (references + learned normals), with
    every setting the profile was calibrated with (:class:`~inference.settings.ScorerSettings`).
    ``preloaded``: the profile and its fingerprint, when the caller has already read them."""
    if preloaded is None:
        fingerprint = LineProfile.fingerprint(path)
        p = LineProfile.load(path)
    else:
        p, fingerprint = preloaded
    scorer = p.scorer.build(device)
    refs = list(p.references) + list(p.learned)
    scorer.fit(refs)
    drift = None
    if p.drift and drift_window:
        drift = DriftMonitor(DriftReference.from_arrays(p.drift), window=drift_window,
                             thresholds=drift_thresholds)
    return LoadedProfile(scorer, p.thresholds, refs, drift, fingerprint or "", p)


class ProfileWatcher:
    """Polls a profile's fingerprint; builds a changed profile in the background.

    A build that fails, for any reason, is logged with its traceback and retried with
    backoff (2 s doubling to 5 min): the file may have been caught half-written, or the
    device was briefly out of memory. The worker keeps the profile it has meanwhile.
    """

    def __init__(self, path: str | Path, build: Callable[[], LoadedProfile], fingerprint: str,
                 every_s: float = 2.0, max_backoff_s: float = 300.0) -> None:
        self.path, self.build, self.every_s, self.max_backoff_s = path, build, every_s, max_backoff_s
        self.current = fingerprint
        self.failures = 0  # consecutive failed builds of the file as it is now
        self._failed: str | None = None  # fingerprint whose build failed, retried at _retry_at
        self._retry_at = 0.0
        self._next_check = time.monotonic() + every_s
        self._thread: threading.Thread | None = None
        self._ready: LoadedProfile | None = None
        self._lock = threading.Lock()

    def poll(self) -> LoadedProfile | None:
        """A freshly built profile once, when the file changed; otherwise None (cheap)."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            return ready
        now = time.monotonic()
        if now < self._next_check or (self._thread is not None and self._thread.is_alive()):
            return None
        self._next_check = now + self.every_s
        fp = LineProfile.fingerprint(self.path)
        if fp is None or fp == self.current:
            return None
        if fp == self._failed and now < self._retry_at:
            return None
        if fp != self._failed:
            self.failures = 0
        self._thread = threading.Thread(target=self._build, args=(fp,), name="profile-reload",
                                        daemon=True)
        self._thread.start()
        return None

    def _build(self, fp: str) -> None:
        t0 = time.monotonic()
        try:
            loaded = self.build()
        except Exception as exc:  # anything: this thread must never die silently
            self.failures += 1
            backoff = min(self.max_backoff_s, 2.0 * 2 ** (self.failures - 1))
            self._failed, self._retry_at = fp, time.monotonic() + backoff
            log.error("new profile at %s not loaded (attempt %d), keeping the current one; "
                      "retrying in %.0fs: %s: %s", self.path, self.failures, backoff,
                      type(exc).__name__, exc, exc_info=not isinstance(exc, ProfileError))
            return
        self.current, self._failed, self.failures = fp, None, 0
        log.info("new profile %s built in %.1fs; switching between batches", loaded.fingerprint[:12],
                 time.monotonic() - t0)
        with self._lock:
            self._ready = loaded
