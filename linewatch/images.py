"""Reading images and dataset folders: shared by producers, workers and evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
