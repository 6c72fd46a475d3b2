"""Reading images: dataset folders (producers, workers, evaluation) and image bytes that
arrive from outside (frames, and the copies inside review items and labels).

Bytes from outside are decoded by one function with one set of limits, checked
before any pixel is decoded: a 2 KB JPEG can declare a 20000x20000 image.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

from linewatch.wire import WireError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageReadError(RuntimeError):
    """A file is missing or is not an image OpenCV can read."""


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (greyscale is expanded to 3 channels)."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    im = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if im is None:
        raise ImageReadError(f"{path} is not a readable image (or does not exist)")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


def list_images(root: Path) -> list[tuple[Path, str | None]]:
    """Images under ``root`` with their truth, understanding the common dataset layouts.

    - MVTec AD: ``train/good``, ``test/<defect>/``, masks under ``ground_truth/``
      (skipped); ``good`` is normal, any other folder a defect.
    - Magnetic tile: ``MT_<Class>/Imgs/*.jpg`` with same-stem ``.png`` masks
      (skipped); ``MT_Free`` is normal.
    - Anything else: every image, truth unknown.
    """
    files: list[tuple[Path, str | None]] = []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = p.relative_to(root).parts
        if "ground_truth" in rel or p.stem.endswith("_mask"):
            continue
        mt = next((part for part in (root.name, *rel) if part.startswith("MT_")), None)
        if mt is not None:
            if p.suffix.lower() == ".png":  # magnetic-tile masks sit beside the .jpg images
                continue
            files.append((p, "normal" if mt == "MT_Free" else "defect"))
        elif "test" in rel or "train" in rel:
            files.append((p, "normal" if p.parent.name == "good" else "defect"))
        else:
            files.append((p, None))
    return files


def load_folder(root: str | Path, limit: int | None = None, seed: int | None = None,
                what: str = "images") -> list[np.ndarray]:
    """Read up to ``limit`` images of a folder (a seeded random draw when ``seed`` is given).

    Raises ImageReadError naming the folder when it is missing or empty, so a
    mistyped ``--references`` path fails at start instead of scoring garbage.
    """
    root = Path(root)
    if not root.is_dir():
        raise ImageReadError(f"{what} folder {root} does not exist")
    files = [p for p, _ in list_images(root)]
    if not files:
        raise ImageReadError(f"{what} folder {root} holds no images")
    if seed is not None:
        rng = np.random.default_rng(seed)
        files = [files[i] for i in rng.permutation(len(files))]
    return [read_rgb(p) for p in files[:limit]]


def write_frames(folder: str | Path, images: list[np.ndarray], jpeg_quality: int | None = 90) -> Path:
    """Write RGB frames as a numbered image folder (references, holdout) and return it.

    JPEG at the camera's quality by default: frames calibrated losslessly but scored after
    JPEG would sit higher than their thresholds expect. ``jpeg_quality=None`` writes PNG.
    """
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        bgr = cv2.cvtColor(im, cv2.COLOR_RGB2BGR)
        if jpeg_quality is None:
            cv2.imwrite(str(folder / f"{i:04d}.png"), bgr)
        else:
            cv2.imwrite(str(folder / f"{i:04d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
    return folder


_PIL_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png"}


def open_limited(data: bytes | None, max_bytes: int, max_pixels: int) -> tuple[object, str]:
    """Open encoded image bytes without decoding pixels: (PIL image, "jpeg" | "png").

    Raises WireError (``empty_payload``, ``too_large``, ``not_an_image``,
    ``too_many_pixels``) before any large allocation can happen.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise WireError("empty_payload", "no image bytes")
    if len(data) > max_bytes:
        raise WireError("too_large", f"{len(data)} bytes is over the limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise WireError("too_many_pixels", f"declared image size is a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise WireError("not_an_image", f"not a readable JPEG/PNG: {exc}") from exc
    except Exception as exc:  # any other parser failure on hostile bytes is still bad input
        raise WireError("not_an_image", f"not a readable JPEG/PNG ({type(exc).__name__}: {exc})") from exc
    fmt = _PIL_FORMATS.get(im.format or "")
    if fmt is None:
        raise WireError("not_an_image", f"image format {im.format} is not JPEG or PNG")
    w, h = im.size
    if w * h > max_pixels:
        raise WireError("too_many_pixels", f"{w}x{h} is over the limit of {max_pixels} pixels")
    return im, fmt


def load_rgb(im: object) -> np.ndarray:
    """Decode an image from :func:`open_limited` to RGB uint8; truncated data is an error."""
    try:
        im.load()  # type: ignore[attr-defined]  # Pillow never pads truncated data unless told to
        return np.asarray(im.convert("RGB"))  # type: ignore[attr-defined]
    except MemoryError:
        raise
    except Exception as exc:  # OSError, SyntaxError, ValueError, or whatever hostile data causes
        raise WireError("truncated_image", f"image data ends early or is corrupt: {exc}") from exc


def decode_limited(data: bytes | None, max_bytes: int, max_pixels: int) -> np.ndarray:
    """RGB uint8 pixels of JPEG/PNG bytes from outside, within the limits, or WireError."""
    im, _fmt = open_limited(data, max_bytes, max_pixels)
    return load_rgb(im)
