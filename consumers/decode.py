"""Validate and decode one frame record, or say exactly why it cannot be scored.

Every check raises :class:`~linewatch.wire.WireError` with a reason from the
bounded ``DL_REASONS`` set; the worker turns that into a dead-letter record. The
order matters: cheap header checks first, then byte limits, then the image
header (dimensions are read without decoding pixels, so a small file that
declares a gigapixel image is refused before it can exhaust memory), and only
then the full decode, which is where truncation shows.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from linewatch.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_FRAME_PIXELS,
    FrameMeta,
    Headers,
    WireError,
)

_PIL_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png"}


def decode_frame(headers: Headers | None, value: bytes | None,
                 max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> tuple[FrameMeta, np.ndarray]:
    """Return the frame's metadata and its RGB uint8 pixels, or raise WireError."""
    meta = FrameMeta.from_headers(headers)
    if not value:
        raise WireError("empty_payload", "the record has no image bytes")
    if len(value) > max_bytes:
        raise WireError("too_large", f"{len(value)} bytes is over the frame limit of {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(value))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise WireError("too_many_pixels", f"declared image size is a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise WireError("not_an_image", f"not a readable JPEG/PNG: {exc}") from exc
    fmt = _PIL_FORMATS.get(im.format or "")
    if fmt is None:
        raise WireError("not_an_image", f"image format {im.format} is not JPEG or PNG")
    if fmt != meta.encoding:
        raise WireError("encoding_mismatch", f"header says {meta.encoding}, bytes are {fmt}")
    w, h = im.size
    if w * h > max_pixels:
        raise WireError("too_many_pixels", f"{w}x{h} is over the limit of {max_pixels} pixels")
    if (w, h) != (meta.width, meta.height):
        raise WireError("size_mismatch", f"header says {meta.width}x{meta.height}, image is {w}x{h}")
    try:
        im.load()  # truncated data raises here (Pillow never pads silently unless told to)
    except (OSError, SyntaxError, ValueError) as exc:
        raise WireError("truncated_image", f"image data ends early or is corrupt: {exc}") from exc
    rgb = np.asarray(im.convert("RGB"))
    return meta, rgb
