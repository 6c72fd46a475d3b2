"""Model failures on purpose, for the fleet tests and the chaos benchmark.

A real line meets GPU out-of-memory bursts, a driver that goes away for a
minute, and the odd frame that crashes a model. :class:`FaultyScorer` wraps a
scorer and produces exactly those, so the worker's handling of each can be
tested against a real worker process (``linewatch worker --inject-faults``, a
hidden option that no production command line should carry).

Spec, comma-separated ``key=value``:

* ``fail_every=N``: every N-th call to ``score`` raises (a transient error);
* ``poison=R:G:B``: a batch holding a frame whose top-left 8x8 block is that colour
  (within 12 levels, so it survives JPEG) raises, every time (a frame that crashes
  the model);
* ``down_after=N`` and ``down_for=S``: after N calls, every call raises for S
  seconds (the model is unavailable; reference images fail too);
* ``slow=S``: every call takes S seconds longer (and logs that it does).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from inference.scoring import Scorer, ScoreResult

log = logging.getLogger(__name__)


class InjectedFault(RuntimeError):
    """A failure FaultyScorer raised on purpose."""


def parse_faults(spec: str) -> dict[str, float | tuple[int, int, int]]:
    out: dict[str, float | tuple[int, int, int]] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = item.partition("=")
        try:
            if key == "poison":
                r, g, b = (int(v) for v in value.split(":"))
                out[key] = (r, g, b)
            elif key in ("fail_every", "down_after", "down_for", "slow"):
                out[key] = float(value)
            else:
                raise ValueError(f"unknown fault {key!r}")
        except ValueError as exc:
            raise ValueError(f"--inject-faults {item!r}: {exc}; expected fail_every=N, "
                             "poison=R:G:B, down_after=N, down_for=SECONDS, slow=SECONDS") from None
    return out


class FaultyScorer:
    """A scorer that fails as ``spec`` says and otherwise defers to ``inner``."""

    def __init__(self, inner: Scorer, spec: str) -> None:
        self.inner = inner
        self.faults = parse_faults(spec)
        self.name = inner.name
        self.calls = 0
        self._down_until: float | None = None

    def fit(self, normals: Sequence[np.ndarray]) -> None:
        self.inner.fit(normals)

    def add_normals(self, normals: Sequence[np.ndarray]) -> None:
        self.inner.add_normals(normals)

    def score(self, images: Sequence[np.ndarray]) -> list[ScoreResult]:
        self.calls += 1
        f = self.faults
        if "slow" in f:
            log.warning("injected: a slow model call (%.1fs)", f["slow"])
            time.sleep(float(f["slow"]))  # type: ignore[arg-type]
        if "down_after" in f and self.calls > f["down_after"]:  # type: ignore[operator]
            if self._down_until is None:
                self._down_until = time.monotonic() + float(f.get("down_for", 30.0))  # type: ignore[arg-type]
            if time.monotonic() < self._down_until:
                raise InjectedFault("injected: the model is unavailable (device lost)")
        if "fail_every" in f and self.calls % int(f["fail_every"]) == 0:  # type: ignore[arg-type]
            raise InjectedFault("injected: CUDA out of memory (transient)")
        poison = f.get("poison")
        if poison is not None and any(_is_marked(im, poison) for im in images):  # type: ignore[arg-type]
            raise InjectedFault("injected: this frame crashes the model")
        return self.inner.score(images)


def _is_marked(im: np.ndarray, colour: tuple[int, int, int]) -> bool:
    corner = im[:8, :8].reshape(-1, im.shape[-1]).mean(axis=0)
    return bool(np.all(np.abs(corner[:3] - np.asarray(colour)) <= 12))
