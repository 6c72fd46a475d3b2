"""Make torchvision importable next to the CPU build of torch.

The torchvision wheel that matches ``torch==2.13.0`` on the registry is a CUDA
build; on a CPU-only torch its import dies with ``operator torchvision::nms does
not exist`` because its C++ ops library cannot load. timm and open_clip import
torchvision, so without this nothing that touches a backbone can start.

Declaring the two operator schemas before the first torchvision import lets the
Python side register its fake kernels. torchvision's own image decoding and
``ops.nms`` stay unusable; linewatch decodes with Pillow/OpenCV and never calls
them. On a machine whose torchvision loads its ops normally (a GPU machine with
matching builds) this does nothing: it loads torchvision's ops library first and
declares nothing when that works. It used to declare the schemas whenever the ops
were not yet registered, i.e. always before torchvision's first import, and the
library's own registration then aborted the process (``Tried to register an
operator (torchvision::nms...) multiple times``): every GPU worker died at start.

``inference.backbones`` and ``inference.clip`` (everything that reaches timm or
open_clip) import this module first; code that imports timm or open_clip itself
must too. ``import inference`` alone loads no torch, so a command line's
``--help`` stays instant.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import torch

_LIB: torch.library.Library | None = None


def ops_library() -> Path | None:
    """torchvision's compiled ops library (``_C`` with this Python's extension suffix), found
    without importing torchvision; None where torchvision is not installed."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            if (path := Path(folder) / f"_C{suffix}").is_file():
                return path
    return None


def apply() -> bool:
    """Declare the missing schemas if needed; return True when it had to."""
    global _LIB
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute probe
        return False
    except (AttributeError, RuntimeError):
        pass
    if importlib.util.find_spec("torchvision") is None:  # nothing will register fake kernels
        return False
    library = ops_library()
    if library is not None:  # none: a torchvision without its ops library, which needs the schemas
        try:
            # what torchvision's own import does first; where it works the real operators are
            # registered, and declaring them too would abort torchvision's import. (Linux and
            # macOS: on Windows torchvision adds a DLL folder first, which this does not.)
            torch.ops.load_library(str(library))
            return False
        except OSError:  # a build for another torch (the CUDA wheel beside a CPU torch)
            pass
    if _LIB is None:
        # The Library object must stay alive for the schemas to stay registered.
        _LIB = torch.library.Library("torchvision", "DEF")
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


apply()
