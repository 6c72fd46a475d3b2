"""int8 matrix products for ViT backbones on CPUs (``--precision int8``).

A worker without a GPU spends over 80% of its time in the transformer's four
matrix products per block (attention in-projection, out-projection, the two
MLP layers). On x86 CPUs without bf16 instructions the fastest exact-enough
alternative to fp32 is PyTorch's fbgemm int8 kernel: weights quantised once per
output channel (symmetric, scale = max |w| / 127), activations quantised per
call. Everything else (layer norms, attention softmax, GELU, the residual
stream, scores and the reference memory) stays fp32.

``reduce_range`` is always on: fbgemm's AVX2 path multiplies uint8 by int8 in
pairs into int16 and saturates with full-range activations; 7-bit activations
avoid that. Measured on a random ViT-B-16-plus-240 window pass: class-token
cosine to fp32 0.9997 with it, 0.99 without.

Not exact, so not the default: thresholds must be calibrated at the precision a
worker scores at (``linewatch calibrate`` records it in the profile). The
quantised-tensor API this uses is marked deprecated in PyTorch 2.13 (kept
working; torch is pinned); the warning is silenced here once, at packing time.
"""

from __future__ import annotations

import warnings

import torch


class Int8Unavailable(RuntimeError):
    """int8 kernels are not available for this device or PyTorch build."""


def check_int8_device(device: str | torch.device) -> None:
    """int8 here means fbgemm's CPU kernels; on a GPU bf16/fp16 are the fast settings."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"--precision int8 runs on CPU only (fbgemm kernels); on {device} use "
                         "--precision bf16 or fp16")


class Int8Linear(torch.nn.Module):
    """``nn.Linear`` with int8 weights (per output channel) and dynamically quantised inputs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float().contiguous()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        scale = (w.abs().amax(dim=1).clamp_min(1e-12) / 127.0).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        b = None if bias is None else bias.detach().float().contiguous()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated.*")
                warnings.filterwarnings("ignore", message=".*quantized.*deprecated.*")
                wq = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
                self._packed = torch.ops.quantized.linear_prepack(wq, b)
        except (RuntimeError, AttributeError) as exc:
            raise Int8Unavailable(
                f"this PyTorch build has no int8 linear kernels ({exc}); use --precision fp32"
            ) from exc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise Int8Unavailable("int8 layers run on CPU only; use --precision bf16/fp16 on a GPU")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features).float().contiguous()
        y = torch.ops.quantized.linear_dynamic(flat, self._packed, True)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each frame of a (B, ...) batch alone, results concatenated.

    int8 sets its activation scale per call, so a call that mixes frames would make
    one frame's result depend on its batch companions; one call per frame does not.
    """
    return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])


def quantize_linears(module: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by :class:`Int8Linear`; returns how many.

    For timm ViTs (DINOv2), whose attention and MLP are plain ``nn.Linear``.
    Linears inside ``nn.MultiheadAttention`` are left alone: it reads their
    weights directly (open_clip's blocks go through :class:`Int8ClipBlock`).
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.MultiheadAttention):
            continue
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8Linear(child.weight, child.bias))
            count += 1
        else:
            count += quantize_linears(child)
    return count


class Int8ClipBlock(torch.nn.Module):
    """open_clip's pre-norm ``ResidualAttentionBlock`` with its four products in int8.

    Same math as the block it replaces (see ``inference.clip._is_plain_block``
    for the kinds accepted); the query and key/value projections are kept as
    two products so :meth:`class_token` can compute the query of the class
    token alone, as the fp32 window path does.
    """

    def __init__(self, blk: torch.nn.Module) -> None:
        super().__init__()
        attn = blk.attn
        c = attn.embed_dim
        self.heads = attn.num_heads
        self.ln_1, self.ln_2, self.ls_1, self.ls_2 = blk.ln_1, blk.ln_2, blk.ls_1, blk.ls_2
        w, b = attn.in_proj_weight, attn.in_proj_bias
        self.q = Int8Linear(w[:c], b[:c])
        self.kv = Int8Linear(w[c:], b[c:])
        self.out = Int8Linear(attn.out_proj.weight, attn.out_proj.bias)
        self.fc = Int8Linear(blk.mlp.c_fc.weight, blk.mlp.c_fc.bias)
        self.act = blk.mlp.gelu
        self.proj = Int8Linear(blk.mlp.c_proj.weight, blk.mlp.c_proj.bias)

    def _attend(self, h: torch.Tensor, n_query: int | None) -> torch.Tensor:
        n, length, c = h.shape
        d = c // self.heads
        hq = h if n_query is None else h[:, :n_query]
        q = self.q(hq).view(n, hq.shape[1], self.heads, d).transpose(1, 2)
        kv = self.kv(h).view(n, length, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, kv[0], kv[1])
        return self.out(a.transpose(1, 2).reshape(n, hq.shape[1], c))

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls_2(self.proj(self.act(self.fc(self.ln_2(x)))))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        if attn_mask is not None:
            raise Int8Unavailable("int8 blocks do not take attention masks (image towers need none)")
        x = x + self.ls_1(self._attend(self.ln_1(x), None))
        return x + self._mlp(x)

    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, C) -> (N, C): the block's output for the first token only."""
        x = x[:, 0] + self.ls_1(self._attend(self.ln_1(x), 1)[:, 0])
        return x + self._mlp(x)
