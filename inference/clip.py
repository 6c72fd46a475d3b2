"""open_clip image/text backbone with WinCLIP window embeddings, from local files only.

WinCLIP describes a small region of the frame by running *only that region's
patch tokens* (plus the class token) through the image encoder, so the class
token attends to nothing outside the window. This module does that for every
k x k window of the patch grid at once: the embedded tokens of the full frame
are computed once, gathered per window into short sequences, and pushed
through the transformer as one large batch of short sequences.

open_clip >= 2.26 runs its transformer batch-first. Implementations written for
the older sequence-first layout permute before calling it and silently mix
tokens across windows (the maps come out near-constant). Here every tensor is
(batch, tokens, width) end to end, and ``tests/test_winclip.py`` checks each
window embedding against an independent, one-window-at-a-time encoding.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from inference import _torchvision_fix  # noqa: F401 - must precede open_clip

CONFIG_DIR = Path(__file__).with_name("model_configs")
PRODUCTION_ARCH = "ViT-B-16-plus-240"
# precision -> dtype of weights and activations; int8 keeps fp32 activations and runs the
# image tower's matrix products in int8 on CPU (inference/int8.py).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}

WEIGHTS_HELP = (
    "CLIP weights are never downloaded at run time. On a machine with internet access, fetch "
    "the checkpoint once (for the production default ViT-B-16-plus-240 that is the laion400m_e31 "
    "'open_clip_pytorch_model.bin' of the Hugging Face repository "
    "timm/vit_base_patch16_plus_240.laion400m_e31), copy it to this machine and pass its path "
    "with --weights PATH (or use the architecture 'local-dir:FOLDER' for a folder holding "
    "open_clip_config.json and the weights)."
)


class ClipUnavailable(RuntimeError):
    """The CLIP architecture or its weights cannot be loaded from local files."""


def register_bundled_configs() -> None:
    """Make the architectures shipped in ``inference/model_configs`` known to open_clip."""
    import open_clip

    if str(CONFIG_DIR) not in {str(p) for p in open_clip.factory._MODEL_CONFIG_PATHS}:
        open_clip.add_model_config(CONFIG_DIR)


@dataclass(frozen=True)
class ClipFeatures:
    """One forward pass of the full frame.

    ``tokens`` are the embedded input tokens (after position embedding and
    ``ln_pre``); they are kept so window embeddings can be computed later for
    only the frames that need a full map (the lazy cascade).
    """

    global_embedding: torch.Tensor  # (B, E) projected class token
    patch_tokens: list[torch.Tensor]  # [(B, H, W, C)] ln_post'd output tokens
    tokens: torch.Tensor  # (B, 1 + H*W, C)
    windows: dict[int, torch.Tensor] = field(default_factory=dict)  # k -> (B, nW, E)


def window_index(grid: tuple[int, int], k: int) -> torch.Tensor:
    """(nW, k*k) patch indices (row-major) of every k x k window at stride 1."""
    gh, gw = grid
    if k > min(gh, gw):
        raise ValueError(f"window size {k} does not fit a {gh}x{gw} patch grid")
    rows = []
    for i in range(gh - k + 1):
        for j in range(gw - k + 1):
            rows.append([(i + di) * gw + (j + dj) for di in range(k) for dj in range(k)])
    return torch.tensor(rows, dtype=torch.long)


class OpenCLIPBackbone(torch.nn.Module):
    """An open_clip ViT with the extras WinCLIP needs: patch tokens and window embeddings.

    ``weights`` is a local checkpoint path; ``None`` is accepted only together
    with ``random_init=True`` (tests and benchmarks on identical random weights).
    The frame is resized whole to the model's square input, never centre-cropped,
    so the anomaly map covers every pixel of the frame.
    """

    has_text = True

    def __init__(
        self,
        arch: str = PRODUCTION_ARCH,
        weights: str | os.PathLike[str] | None = None,
        *,
        random_init: bool = False,
        seed: int = 0,
        precision: str = "fp32",
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        import open_clip

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")

        register_bundled_configs()
        if weights is None and not random_init:
            raise ClipUnavailable(f"no weights given for openclip:{arch}. {WEIGHTS_HELP}")
        if weights is not None and not Path(weights).is_file():
            raise ClipUnavailable(f"CLIP weights file {weights} does not exist. {WEIGHTS_HELP}")
        name = arch
        if not arch.startswith("local-dir:") and arch not in open_clip.list_models():
            raise ClipUnavailable(
                f"unknown open_clip architecture {arch!r}; see open_clip.list_models() "
                f"(the production default is {PRODUCTION_ARCH})"
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = open_clip.create_model(name, pretrained=str(weights) if weights else None)
            except Exception as exc:  # not a weights-only checkpoint, or another model's weights
                if weights is None:
                    raise
                from inference.backbones import load_error

                raise ClipUnavailable(
                    f"CLIP weights file {weights} cannot be loaded into openclip:{arch} "
                    f"({load_error(exc)}). It must be an open_clip state dict of that architecture, "
                    "readable weights-only (no code in it runs: a TorchScript archive or a pickled "
                    "object is refused). " + WEIGHTS_HELP) from None
        model.eval()
        # Weights and activations in the chosen type; scores, text directions and the
        # reference memory stay float32 (see WinCLIPScorer). bf16/fp16 are for GPUs: on a
        # CPU without bf16 instructions they are slower than fp32.
        self.precision = precision
        model.to(PRECISIONS[precision])
        visual = model.visual
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise ClipUnavailable(
                f"openclip:{arch} pools its image tokens with {visual.pool_type!r}/attention pooling; "
                "WinCLIP window embeddings need a class-token ViT (e.g. ViT-B-16-plus-240, ViT-B-16)"
            )
        if getattr(visual, "final_ln_after_pool", False):
            raise ClipUnavailable(f"openclip:{arch} normalises after pooling; not supported")
        self.arch = arch
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(name)
        if image_size is not None:
            _resize_positions(visual, image_size, arch)
        size = visual.image_size
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.grid = tuple(visual.grid_size)
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._windows: dict[int, torch.Tensor] = {}
        self._plain_blocks = all(_is_plain_block(b) for b in visual.transformer.resblocks)
        if precision == "int8":
            self._quantize_image_tower()

    def _quantize_image_tower(self) -> None:
        """Swap the image tower's blocks for int8 ones; the text tower runs once, stays fp32."""
        from inference.int8 import Int8ClipBlock

        if not self._plain_blocks:
            raise ClipUnavailable(f"--precision int8 needs open_clip's standard ViT blocks; "
                                  f"openclip:{self.arch} has others (use fp32)")
        blocks = self.model.visual.transformer.resblocks
        for i, blk in enumerate(blocks):
            blocks[i] = Int8ClipBlock(blk)

    # -- images -----------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray]) -> torch.Tensor:
        """RGB uint8 arrays of any size -> normalised (B, 3, H, W) on the model's device."""
        from inference.backbones import resize_batch

        out = resize_batch(images, self.image_size)
        x = torch.from_numpy(out).to(self.mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def window_index(self, k: int) -> torch.Tensor:
        if k not in self._windows:
            self._windows[k] = window_index(self.grid, k).to(self.mean.device)
        return self._windows[k]

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, window_sizes: tuple[int, ...] = ()) -> ClipFeatures:
        """Full-frame pass (global embedding, patch tokens) plus the requested window scales."""
        visual = self.model.visual
        x = x.to(next(self.model.parameters()).dtype)
        tokens = visual._embeds(x)
        if self.precision == "int8":
            from inference.int8 import per_frame

            out = per_frame(visual.transformer, tokens)
        else:
            out = visual.transformer(tokens)
        out = visual.ln_post(out)
        g = out[:, 0] @ visual.proj
        gh, gw = self.grid
        patches = out[:, 1:].reshape(out.shape[0], gh, gw, -1)
        feats = ClipFeatures(global_embedding=g, patch_tokens=[patches], tokens=tokens)
        for k in window_sizes:
            feats.windows[k] = self.encode_windows(tokens, k)
        return feats

    @torch.inference_mode()
    def encode_windows(self, tokens: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
        """(B, 1+N, C) embedded tokens -> (B, nW, E) embeddings of every k x k window.

        Each window is the class token followed by its k*k patch tokens, each
        still carrying the position embedding of where it sits in the frame.
        In int8 one chunk is one frame's windows: the activation scale is set
        per call, and a frame's scores must not depend on its batch companions.
        """
        visual = self.model.visual
        idx = self.window_index(k)  # (nW, k*k)
        b, _, c = tokens.shape
        n_w = idx.shape[0]
        if self.precision == "int8":
            chunk = n_w
        cls = tokens[:, :1, :].unsqueeze(1).expand(b, n_w, 1, c)
        win = tokens[:, 1:, :][:, idx]  # (B, nW, k*k, C)
        seqs = torch.cat([cls, win], dim=2).reshape(b * n_w, 1 + k * k, c)
        outs = []
        for s in range(0, seqs.shape[0], chunk):  # bounds activation memory on big batches
            outs.append(visual.ln_post(self._class_token_out(seqs[s:s + chunk])) @ visual.proj)
        return torch.cat(outs).reshape(b, n_w, -1)

    def _class_token_out(self, seqs: torch.Tensor) -> torch.Tensor:
        """(N, L, C) sequences -> (N, C) class-token output of the transformer.

        A window embedding is only its class token, so the last block runs its
        query, output projection and MLP for that one token (keys and values
        still come from every token of the window): for 2x2 / 3x3 windows that
        removes most of the last block's work, about 6% of the window pass's
        arithmetic, and the result is the same up to float rounding
        (``tests/test_winclip.py`` checks every window against open_clip's own
        blocks). Blocks of an unfamiliar kind run whole, through open_clip.
        """
        blocks = self.model.visual.transformer.resblocks
        if not self._plain_blocks:
            return self.model.visual.transformer(seqs)[:, 0]
        x = seqs
        for blk in blocks[:-1]:
            x = blk(x)
        if self.precision == "int8":
            return blocks[-1].class_token(x)
        return _last_block_class_token(blocks[-1], x)

    # -- text -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (N, E)."""
        device = self.mean.device
        toks = self.tokenizer(prompts).to(device)
        emb = self.model.encode_text(toks).float()
        return torch.nn.functional.normalize(emb, dim=-1)

    def text_direction(self, prompts: list[str]) -> torch.Tensor:
        """One unit direction (E,) for a prompt ensemble: the mean of its unit embeddings."""
        return torch.nn.functional.normalize(self.encode_text(prompts).mean(dim=0), dim=-1)


def _resize_positions(visual: torch.nn.Module, size: int, arch: str) -> None:
    """Run the image tower at ``size`` px: its learned position embeddings of the patch grid
    interpolated bilinearly to the new grid (the class token's kept), as AnomalyCLIP runs
    OpenAI's 336 px ViT-L at 518. More patches see finer detail; the model was never trained
    at that size, so what it buys is measured, not assumed."""
    patch = visual.conv1.kernel_size[0]
    if size % patch or size < patch:
        raise ClipUnavailable(f"--image-size {size}: openclip:{arch} cuts {patch}-px patches; give a "
                              f"multiple of {patch} (e.g. {max(1, round(size / patch)) * patch})")
    pos = visual.positional_embedding
    gh, gw = visual.grid_size
    if pos.ndim != 2 or pos.shape[0] != gh * gw + 1:
        raise ClipUnavailable(f"openclip:{arch} has no learned per-patch position table to resize")
    n = size // patch
    with torch.no_grad():
        grid = pos[1:].float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid, (n, n), mode="bilinear", align_corners=False)
        new = torch.cat([pos[:1].float(), grid.permute(0, 2, 3, 1).reshape(n * n, -1)]).to(pos.dtype)
    visual.positional_embedding = torch.nn.Parameter(new, requires_grad=pos.requires_grad)
    visual.grid_size = (n, n)
    visual.image_size = (size, size)


def _is_plain_block(blk: torch.nn.Module) -> bool:
    """open_clip's standard pre-norm block, whose math :func:`_last_block_class_token` repeats."""
    attn = getattr(blk, "attn", None)
    return (
        type(blk).__name__ == "ResidualAttentionBlock"
        and not hasattr(blk, "ln_1_kv")
        and isinstance(attn, torch.nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.in_proj_bias is not None
        and attn.bias_k is None
        and attn.dropout == 0.0
    )


def _last_block_class_token(blk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock`` on (N, L, C), computed for the first token only -> (N, C)."""
    n, length, c = x.shape
    attn = blk.attn
    heads, d = attn.num_heads, c // attn.num_heads
    w, bias = attn.in_proj_weight, attn.in_proj_bias
    h = blk.ln_1(x)
    q = torch.nn.functional.linear(h[:, :1], w[:c], bias[:c]).view(n, 1, heads, d).transpose(1, 2)
    kv = torch.nn.functional.linear(h, w[c:], bias[c:]).view(n, length, 2, heads, d).permute(2, 0, 3, 1, 4)
    a = torch.nn.functional.scaled_dot_product_attention(q, kv[0], kv[1])  # (N, h, 1, d)
    x = x[:, 0] + blk.ls_1(attn.out_proj(a.reshape(n, c)))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
