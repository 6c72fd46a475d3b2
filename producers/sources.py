"""Where frames come from: image folders, video files, cameras and a synthetic conveyor.

Every source yields :class:`SourceFrame` objects holding an RGB uint8 array and,
where the source knows it, the ground truth ("normal"/"defect"). Ground truth
travels in a frame header so the demo and evaluation feeds can report
precision and recall; live cameras have none.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from linewatch.images import IMAGE_SUFFIXES, list_images, read_rgb


class SourceError(RuntimeError):
    """A source cannot be opened; the message names it and says what to check."""


@dataclass
class SourceFrame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    truth: str | None = None
    name: str = ""
    mask: np.ndarray | None = None  # (H, W) bool, where known (synthetic feed)


class FolderSource:
    """Every image of a folder, in sorted order (optionally looping forever)."""

    def __init__(self, root: str | Path, loop: bool = False) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"image folder {self.root} does not exist")
        self.files = list_images(self.root)
        if not self.files:
            raise SourceError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root}")
        self.loop = loop

    def __iter__(self) -> Iterator[SourceFrame]:
        while True:
            for path, truth in self.files:
                yield SourceFrame(read_rgb(path), truth, str(path))
            if not self.loop:
                return


class VideoSource:
    """A video file, a camera device index or an RTSP/HTTP stream, through OpenCV."""

    def __init__(self, target: str | int, loop: bool = False) -> None:
        import cv2

        self.target = target
        self.loop = loop and isinstance(target, str) and Path(target).is_file()
        self._cv2 = cv2
        cap = cv2.VideoCapture(target)
        if not cap.isOpened():
            cap.release()
            kind = "camera index" if isinstance(target, int) else "video or stream"
            raise SourceError(
                f"OpenCV could not open {kind} {target!r}: check the path/URL, that the "
                "camera is connected and not used by another process, and that this "
                "OpenCV build has the needed backend (FFmpeg for RTSP/HTTP)."
            )
        cap.release()

    def __iter__(self) -> Iterator[SourceFrame]:
        cv2 = self._cv2
        n = 0
        while True:
            cap = cv2.VideoCapture(self.target)
            try:
                while True:
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    n += 1
                    yield SourceFrame(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), None, f"{self.target}#{n}")
            finally:
                cap.release()
            if not self.loop:
                return


TEXTURES = ("brick", "gravel", "grass")
DEFECT_KINDS = ("scratch", "crack", "stain", "pit", "burn")


def _texture(name: str) -> np.ndarray:
    """A real 512x512 greyscale texture photo shipped with scikit-image (CC0)."""
    from skimage import data

    if name not in TEXTURES:
        raise SourceError(f"unknown texture {name!r}; choose one of {', '.join(TEXTURES)}")
    im = getattr(data, name)()
    return im if im.ndim == 2 else im[..., 0]


class SyntheticConveyor:
    """A conveyor belt made of a real texture photo, with synthetic surface defects.

    The belt is the texture tiled with mirrored copies (so it has no seams) and
    it moves by ``step`` pixels a frame; lighting drifts slightly from frame to
    frame, as on a real line. With probability ``defect_rate`` a frame gets one
    defect from ``defect-synthesis`` (scratch, crack, stain, pitting or burn),
    whose exact mask decides the ground truth: a generator that happened to
    paint nothing leaves the frame "normal".

    With probability ``marking_rate`` a frame carries a printed lot code instead: a
    normal feature the references lack, i.e. the recurring false alarm that operator
    verdicts teach the workers away.

    Deterministic for a given ``seed``: the same seed gives the same frames.
    """

    def __init__(self, texture: str = "brick", size: tuple[int, int] = (448, 448),
                 defect_rate: float = 0.1, seed: int = 0, step: int = 23,
                 brightness: float = 1.0, marking_rate: float = 0.0) -> None:
        for name, rate in (("defect rate", defect_rate), ("marking rate", marking_rate)):
            if not 0.0 <= rate <= 1.0:
                raise SourceError(f"{name} must be within [0, 1], got {rate}")
        self.marking_rate = marking_rate
        tex = _texture(texture)
        row = np.concatenate([tex, tex[:, ::-1]], axis=1)
        self.belt = np.concatenate([row, row[::-1, :]], axis=0)  # 1024x1024, seamless
        self.width, self.height = size
        if self.width > self.belt.shape[1] or self.height > self.belt.shape[0]:
            raise SourceError(f"frame size {size} is larger than the belt {self.belt.shape[::-1]}")
        if defect_rate > 0 and min(size) < MIN_DEFECT_FRAME_SIDE:
            raise SourceError(f"frame size {size}: the defect generators need frames of at least "
                              f"{MIN_DEFECT_FRAME_SIDE} px a side (or defect_rate 0)")
        self.defect_rate = defect_rate
        self.seed = seed
        self.step = step
        self.brightness = brightness  # a lamp dimming on the line is brightness < 1

    def marked(self, index: int) -> bool:
        """Whether frame ``index`` carries a printed lot code (cheap: no image is made)."""
        return bool(self.marking_rate
                    and np.random.default_rng((self.seed, index, 1)).random() < self.marking_rate)

    def frame(self, index: int, allow_defect: bool = True) -> SourceFrame:
        """The ``index``-th frame of the belt (pure function of seed and index)."""
        rng = np.random.default_rng((self.seed, index))
        bh, bw = self.belt.shape
        x = (index * self.step) % (bw - self.width)
        y = int(rng.integers(0, bh - self.height))
        patch = self.belt[y:y + self.height, x:x + self.width].astype(np.float32)
        gain = self.brightness * float(rng.uniform(0.97, 1.03))
        rgb = np.clip(np.repeat(patch[..., None] * gain, 3, axis=2), 0, 255).astype(np.uint8)
        truth, mask, name = "normal", None, f"synthetic#{index}"
        if allow_defect and self.marked(index):
            rgb, name = _lot_code(rgb, index), f"synthetic#{index}:lot-code"
        if allow_defect and rng.random() < self.defect_rate:
            kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
            rgb, mask = _apply_defect(rgb, kind, int(rng.integers(2**31)))
            if mask.any():
                truth, name = "defect", f"synthetic#{index}:{kind}"
            else:
                mask = None
        return SourceFrame(rgb, truth, name, mask)

    def __iter__(self) -> Iterator[SourceFrame]:
        i = 0
        while True:
            yield self.frame(i)
            i += 1

    def normals(self, count: int, offset: int = 10_000_000) -> list[np.ndarray]:
        """Defect-free frames from a part of the belt's sequence the live feed never reaches
        quickly, used as references and held-out normals for calibration."""
        return [self.frame(offset + i, allow_defect=False).image for i in range(count)]


MIN_DEFECT_FRAME_SIDE = 192  # defect-synthesis's burns need this much room
LOT_CODE_PITCH = 3.0  # dot spacing at 448 px
LOT_CODE_INK = 80.0   # grey level of the ink
# 5x7 dot-matrix glyphs, as an ink-jet coder prints them (rows top to bottom, 5 bits each)
_GLYPHS = {
    "L": (16, 16, 16, 16, 16, 16, 31), "O": (14, 17, 17, 17, 17, 17, 14),
    "T": (31, 4, 4, 4, 4, 4, 4), " ": (0,) * 7,
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
}


def _lot_code(rgb: np.ndarray, index: int) -> np.ndarray:
    """An ink-jet lot code printed on the part: normal, but absent from the first references.

    The recurring false alarm of a new line: every part of some batches carries it, the
    model has never seen it, and operators' "normal" verdicts are how it gets learned.
    It sits at the same place on every part (give or take the part's placement), as a
    coder prints it. Drawn dot by dot with NumPy, so frames are the same whatever OpenCV renders text
    like (OpenCV 5's new text renderer changed the old putText lot codes, and with them
    what the review-loop test measured).
    """
    out = rgb.astype(np.float32)
    rng = np.random.default_rng((index, 7))
    h, w = out.shape[:2]
    pitch = max(2.0, LOT_CODE_PITCH * w / 448)  # dot spacing in pixels
    radius = 0.42 * pitch
    # the coder prints at one place on the part; parts sit a little differently each time
    x0, y0 = int(w * 0.12 + rng.integers(-6, 7)), int(h * 0.72 + rng.integers(-6, 7))
    yy, xx = np.mgrid[0:h, 0:w]
    ink = np.zeros((h, w), np.float32)
    for ci, ch in enumerate(f"LOT {2400 + index % 50:04d}"):
        for row, bits in enumerate(_GLYPHS[ch]):
            for col in range(5):
                if bits >> (4 - col) & 1:
                    cx, cy = x0 + (ci * 6 + col) * pitch, y0 + row * pitch
                    ys, xs = slice(max(0, int(cy - pitch)), int(cy + pitch) + 1), \
                        slice(max(0, int(cx - pitch)), int(cx + pitch) + 1)
                    d = np.hypot(yy[ys, xs] - cy, xx[ys, xs] - cx)
                    ink[ys, xs] = np.maximum(ink[ys, xs], np.clip(radius + 0.5 - d, 0.0, 1.0))
    out = out * (1 - 0.85 * ink[..., None]) + LOT_CODE_INK * 0.85 * ink[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _apply_defect(rgb: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect with defect-synthesis; returns the image and its exact mask."""
    try:
        import defect_synthesis as ds
    except ImportError as exc:
        raise SourceError(
            "the synthetic conveyor needs defect-synthesis: "
            "`pip install --no-deps defect-synthesis==0.1.0` (its opencv-python "
            "dependency would clash with opencv-python-headless, hence --no-deps)"
        ) from exc
    gens = {
        "scratch": lambda: ds.ScratchGenerator(length_range=(60, 160), width_range=(2, 4)),
        "crack": lambda: ds.CrackGenerator(),
        "stain": lambda: ds.StainGenerator(),
        "pit": lambda: ds.PittingGenerator(),
        "burn": lambda: ds.BurnGenerator(),
    }
    # defect-synthesis draws from the global `random` and `np.random` generators;
    # seed both so a frame is reproducible, and restore them so nobody else notices.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        result = gens[kind]().apply(rgb.copy())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return result.image.astype(np.uint8), result.anomaly_mask > 0


def open_source(spec: str, loop: bool = False, **synthetic: object) -> Iterator[SourceFrame]:
    """Open a source from its command-line spelling.

    ``synthetic[:TEXTURE]``, a camera index (``0``), an ``rtsp://``/``http(s)://`` URL,
    a folder of images, or a video file.
    """
    if spec == "synthetic" or spec.startswith("synthetic:"):
        texture = spec.split(":", 1)[1] if ":" in spec else "brick"
        return iter(SyntheticConveyor(texture=texture, **synthetic))  # type: ignore[arg-type]
    if re.fullmatch(r"\d+", spec):
        return iter(VideoSource(int(spec)))
    if re.match(r"^(rtsp|rtsps|http|https)://", spec):
        return iter(VideoSource(spec))
    path = Path(spec)
    if path.is_dir():
        return iter(FolderSource(path, loop=loop))
    if path.is_file():
        return iter(VideoSource(str(path), loop=loop))
    raise SourceError(
        f"source {spec!r} is not a folder, a video file, a camera index, an RTSP/HTTP URL "
        "or 'synthetic[:brick|gravel|grass]'"
    )
