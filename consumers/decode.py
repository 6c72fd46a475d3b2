"""Validate and decode one frame record, or say exactly why it cannot be scored.

Every check raises :class:`~linewatch.wire.WireError` with a reason from the
bounded ``DL_REASONS`` set; the worker turns that into a dead-letter record. The
order matters: cheap header checks first, then byte limits, then the image
header (dimensions are read without decoding pixels, so a small file that
declares a gigapixel image is refused before it can exhaust memory), and only
then the full decode, which is where truncation shows.
"""

from __future__ import annotations

import numpy as np

from linewatch.images import load_rgb, open_limited
from linewatch.wire import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_FRAME_PIXELS,
    FrameMeta,
    Headers,
    WireError,
)


def decode_frame(headers: Headers | None, value: bytes | None,
                 max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_pixels: int = DEFAULT_MAX_FRAME_PIXELS) -> tuple[FrameMeta, np.ndarray]:
    """Return the frame's metadata and its RGB uint8 pixels, or raise WireError."""
    meta = FrameMeta.from_headers(headers)
    if not value:
        raise WireError("empty_payload", "the record has no image bytes")
    im, fmt = open_limited(value, max_bytes, max_pixels)
    if fmt != meta.encoding:
        raise WireError("encoding_mismatch", f"header says {meta.encoding}, bytes are {fmt}")
    if im.size != (meta.width, meta.height):  # type: ignore[attr-defined]
        w, h = im.size  # type: ignore[attr-defined]
        raise WireError("size_mismatch", f"header says {meta.width}x{meta.height}, image is {w}x{h}")
    return meta, load_rgb(im)
