"""``inference._torchvision_fix``: torchvision (which timm and open_clip import) must import on
every machine the worker runs on."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

PROBE = """
import torch
from inference import _torchvision_fix as fix
declared = fix._LIB is not None
import timm, torchvision
timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28)
try:  # whether torchvision's ops library loads (already loaded where it did: no error)
    torch.ops.load_library(str(fix.ops_library()))
    loads = True
except OSError:
    loads = False
print(declared, loads)
"""


def test_the_fix_declares_torchvisions_operators_only_where_its_library_cannot_load():
    """A fresh interpreter imports the fix, then torchvision and timm, and builds a ViT. The fix
    must declare the operators exactly where torchvision's compiled library cannot load (here:
    the CUDA wheel beside a CPU torch, where torchvision's import otherwise dies). Where it
    loads (a GPU machine with matching builds) it used to declare them anyway, and
    torchvision's own registration then aborted the process: found on an H200 (torch
    2.11+cu130), where every backbone import died. This machine only has the first case;
    the second was run on the device machine (``python -m benchmarks.presets --device cuda``,
    README), and this same test fails there without the fix (the interpreter aborts). The
    decisive check is that the interpreter survives; ``declared`` and ``loads`` say which of
    the two cases this machine is (the fix's own rule, so not independent evidence)."""
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    declared, loads = r.stdout.split()
    assert declared != loads, r.stdout  # declared where, and only where, the library does not load
