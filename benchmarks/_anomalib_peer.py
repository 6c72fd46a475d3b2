"""The anomalib side of ``benchmarks/winclip.py``; runs inside ``benchmarks/.venv-anomalib``.

Builds anomalib's WinClipModel on the *same* random ViT-B-16-plus-240 weights
linewatch uses (a state dict file), feeds it the *same* normalised input tensors,
times its forward pass and writes image scores and timings as JSON. It never
downloads anything: the model is created without pretrained weights and the
state dict is loaded from disk.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import time
from pathlib import Path

import torch

# The registry's torchvision is a CUDA build; the same fix linewatch applies (loaded from its
# file, not through the inference package, whose other modules need linewatch's environment).
_FIX = Path(__file__).resolve().parent.parent / "inference" / "_torchvision_fix.py"
_spec = importlib.util.spec_from_file_location("_lw_torchvision_fix", _FIX)
_fix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fix)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--inputs", required=True, help=".pt with 'frames' and 'references' tensors")
    ap.add_argument("--class-name", required=True)
    ap.add_argument("--shots", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import anomalib.models.image.winclip.torch_model as tm

    tm.PRETRAINED = None  # random init, weights come from --weights below
    model = tm.WinClipModel()
    model.clip.load_state_dict(torch.load(a.weights, weights_only=True), strict=True)
    model.eval()
    data = torch.load(a.inputs, weights_only=True)
    frames, refs = data["frames"], data["references"][: a.shots]
    with torch.no_grad():
        model.setup(a.class_name, refs if a.shots else None)
        model(frames[:1])  # warm-up
        scores: list[float] = []
        t0 = time.perf_counter()
        for i in range(0, frames.shape[0], a.batch_size):
            out = model(frames[i:i + a.batch_size])
            scores += out.pred_score.float().tolist()
        spent = time.perf_counter() - t0
    result = {"open_clip": importlib.metadata.version("open_clip_torch"), "k_shot": model.k_shot,
              "scores": scores, "seconds": spent, "frames": int(frames.shape[0])}
    Path(a.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
