"""Make torchvision importable next to the CPU build of torch.

The torchvision wheel that matches ``torch==2.13.0`` on the registry is a CUDA
build; on a CPU-only torch its import dies with ``operator torchvision::nms does
not exist`` because its C++ ops library cannot load. timm and open_clip import
torchvision, so without this nothing that touches a backbone can start.

Declaring the two operator schemas before the first torchvision import lets the
Python side register its fake kernels. torchvision's own image decoding and
``ops.nms`` stay unusable; linewatch decodes with Pillow/OpenCV and never calls
them. On a machine whose torchvision loads its ops normally this does nothing.

``inference.backbones`` and ``inference.clip`` (everything that reaches timm or
open_clip) import this module first; code that imports timm or open_clip itself
must too. ``import inference`` alone loads no torch, so a command line's
``--help`` stays instant.
"""

from __future__ import annotations

import torch

_LIB: torch.library.Library | None = None


def apply() -> bool:
    """Declare the missing schemas if needed; return True when it had to."""
    global _LIB
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute probe
        return False
    except (AttributeError, RuntimeError):
        pass
    if _LIB is None:
        # The Library object must stay alive for the schemas to stay registered.
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


apply()
