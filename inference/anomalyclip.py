"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic learned prompts, for users with CLIP weights.

WinCLIP asks CLIP about "a photo of a damaged bottle" with hand-written prompt
ensembles. AnomalyCLIP learns the prompt instead, and learns it *object-agnostic*:
two sequences of learnable word embeddings, one before "object." (normal) and one
before "damaged object." (abnormal), trained once on an auxiliary dataset with
defect masks and then used on any product, zero-shot. What is learned is
"normal versus abnormal", not what a bottle looks like.

Built here, each piece of the paper a field of :class:`PromptDesign`, so that what a
prompt file was trained with is what it is scored with:

- the prompt learner (:class:`PromptLearner`): the two contexts run through CLIP's own
  frozen text transformer, plus the paper's *deep* prompts: learned tokens that replace
  the first ``deep_length`` context positions of the residual stream at the input of
  text blocks 2 .. ``deep_depth`` (the paper: 4 tokens, depth 9);
- DPAM (``dpam_from``): from that image block on, a second, value-value attention path
  (softmax(v v^T) v: each patch attends mostly to itself, the "diagonally prominent"
  map) carries the patch tokens that are compared with the text, while the stock
  attention path carries on unchanged to the class token (the image embedding);
- scoring (:class:`AnomalyCLIPScorer`) and training (:func:`train_prompts`: the paper's
  global image-level cross-entropy plus its local focal and dice losses on the patch
  maps of four blocks).

Prompts are stored as safetensors with their design in the metadata (:func:`save_prompts`,
:func:`load_prompts`); a released AnomalyCLIP checkpoint is read with ``weights_only``,
checked against the backbone (its stored prompt tokens and token embeddings must be this
model's) and converted (:func:`convert_checkpoint`), never unpickled.

The paper runs OpenAI's 336 px ViT-L at 518 px: ``--image-size 518`` does the same (the
backbone interpolates its position embeddings, ``inference.clip``). Maps are smoothed at
evaluation as every method's are (``linewatch evaluate``: a Gaussian of 4 px at 256 px; the
paper's is 4 px at 518 px).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from inference.clip import OpenCLIPBackbone, _is_plain_block
from inference.scoring import NotFittedError, ScoreResult

TEMPLATES = ("{} object.", "{} damaged object.")  # normal, abnormal; {} = the learned context
N_CTX = 12
TEMPERATURE = 0.07
FORMAT = "linewatch-anomalyclip-2"  # -1 files (contexts only, no design) still load


class PromptError(ValueError):
    """A prompt file that cannot be used with this backbone (shape, keys, format)."""


@dataclass(frozen=True)
class PromptDesign:
    """How prompts are put into CLIP: fixed at training, stored with the prompts, used at scoring.

    ``deep_depth`` counts text blocks with learned tokens (1: the input only; the paper: 9);
    ``deep_length`` is how many context positions the deeper blocks' tokens replace (the
    paper: 4). ``dpam_from`` is the 1-based first image block with DPAM's value-value path
    (0: none; AnomalyCLIP's code: block 6 of 24, the last 19). ``global_ln_post``: whether
    the class token goes through ``ln_post`` before the projection, as in CLIP; AnomalyCLIP's
    code projects it without, and its released prompts were learned against that.
    """

    n_ctx: int = N_CTX
    deep_depth: int = 1
    deep_length: int = 0
    dpam_from: int = 0
    global_ln_post: bool = True

    def check(self, backbone: OpenCLIPBackbone, where: str) -> None:
        """PromptError naming ``where`` if this design does not fit ``backbone``."""
        text_blocks = len(backbone.model.transformer.resblocks)
        image_blocks = len(backbone.model.visual.transformer.resblocks)
        if self.n_ctx < 1 or self.deep_depth < 1:
            raise PromptError(f"{where}: context length and deep-prompt depth must be at least 1")
        if self.deep_depth > text_blocks:
            raise PromptError(f"{where}: deep prompts in {self.deep_depth} text blocks, but "
                              f"openclip:{backbone.arch} has {text_blocks}")
        window = int(backbone.model.positional_embedding.shape[0])
        words = max(int((t != 0).sum()) for t in backbone.tokenizer([t.format("") for t in TEMPLATES]))
        if self.n_ctx + words > window:  # words: start, the template's words, end
            raise PromptError(f"{where}: {self.n_ctx} context tokens leave no room for the prompts' "
                              f"words in CLIP's {window}-token window: at most {window - words}")
        if self.deep_depth > 1 and not 1 <= self.deep_length <= self.n_ctx:
            raise PromptError(f"{where}: deep prompts of {self.deep_length} tokens must replace 1 .. "
                              f"{self.n_ctx} (the context length) positions")
        if self.deep_depth == 1 and self.deep_length:
            raise PromptError(f"{where}: deep prompts of {self.deep_length} tokens but no deeper block "
                              "to put them in (deep_depth 1)")
        if not 0 <= self.dpam_from <= image_blocks:
            raise PromptError(f"{where}: DPAM from image block {self.dpam_from}, but "
                              f"openclip:{backbone.arch} has {image_blocks} (0 = no DPAM)")
        if self.deep_depth > 1 and not backbone.model.transformer.batch_first:
            raise PromptError(f"{where}: deep prompts need open_clip's batch-first text transformer")
        if self.dpam_from and not all(_is_plain_block(b) for b in
                                      backbone.model.visual.transformer.resblocks[self.dpam_from - 1:]):
            raise PromptError(f"{where}: DPAM needs open_clip's standard fp32/bf16/fp16 image blocks "
                              f"(openclip:{backbone.arch} at --precision {backbone.precision} has others)")


def paper_dpam_from(backbone: OpenCLIPBackbone) -> int:
    """AnomalyCLIP's DPAM start (block 6 of ViT-L's 24: the last 19) scaled to this image tower."""
    return max(1, round(len(backbone.model.visual.transformer.resblocks) / 4))


def paper_design(backbone: OpenCLIPBackbone) -> PromptDesign:
    """The design of AnomalyCLIP's code and released checkpoints (12 context tokens, deep
    prompts of 4 tokens in 9 text blocks, DPAM, the class token projected without ln_post),
    with depth and DPAM start fitted to a smaller model's towers."""
    depth = min(9, len(backbone.model.transformer.resblocks))
    return PromptDesign(n_ctx=N_CTX, deep_depth=depth, deep_length=4 if depth > 1 else 0,
                        dpam_from=paper_dpam_from(backbone), global_ln_post=False)


class PromptLearner(torch.nn.Module):
    """Two learnable contexts (``design.n_ctx`` word embeddings each) in front of "object." and
    "damaged object.", and the deep prompts (one ``(deep_length, width)`` tensor per text block
    after the first, up to ``deep_depth``), encoded by the backbone's frozen text transformer."""

    def __init__(self, backbone: OpenCLIPBackbone, design: PromptDesign | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        design = design or PromptDesign()
        design.check(backbone, "prompt design")
        n_ctx = design.n_ctx
        model = backbone.model
        width = model.token_embedding.weight.shape[1]
        gen = torch.Generator().manual_seed(seed)
        self.normal_ctx = torch.nn.Parameter(torch.randn(n_ctx, width, generator=gen) * 0.02)
        self.abnormal_ctx = torch.nn.Parameter(torch.randn(n_ctx, width, generator=gen) * 0.02)
        self.deep = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(design.deep_length, width, generator=gen) * 0.02)
             for _ in range(design.deep_depth - 1)])
        holder = " ".join(["X"] * n_ctx)
        tokens = backbone.tokenizer([t.format(holder) for t in TEMPLATES])
        x_id = backbone.tokenizer(["X"])[0, 1]
        if not bool((tokens[:, 1:1 + n_ctx] == x_id).all()):
            raise PromptError("this tokenizer does not give one token per context placeholder")
        words = backbone.tokenizer([t.format("") for t in TEMPLATES])  # SOT, the words, EOT
        for row, w in zip(tokens, words, strict=True):
            tail = w[1:int((w != 0).sum())]
            if not torch.equal(row[1 + n_ctx:1 + n_ctx + len(tail)], tail):
                raise PromptError(f"{n_ctx} context tokens leave no room for the prompt's words in "
                                  f"CLIP's {tokens.shape[1]}-token context: use fewer")
        self.register_buffer("tokens", tokens, persistent=False)
        self.design = design

    @property
    def n_ctx(self) -> int:
        return self.design.n_ctx

    def forward(self, backbone: OpenCLIPBackbone) -> torch.Tensor:
        """(2, E) unit text directions: normal, abnormal (differentiable in every prompt)."""
        from open_clip.transformer import text_global_pool

        m = backbone.model
        tokens = self.tokens.to(m.token_embedding.weight.device)
        emb = m.token_embedding(tokens).float()
        ctx = torch.stack([self.normal_ctx, self.abnormal_ctx]).to(emb)
        x = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], dim=1)
        dtype = m.transformer.get_cast_dtype()
        x = (x + m.positional_embedding.float()).to(dtype)
        if not len(self.deep):
            x = m.transformer(x, attn_mask=m.attn_mask)
        else:  # batch-first (PromptDesign.check): (2, L, C)
            for i, blk in enumerate(m.transformer.resblocks):
                if 1 <= i <= len(self.deep):  # this block's learned tokens replace the previous ones
                    deep = self.deep[i - 1].to(x).expand(x.shape[0], -1, -1)
                    x = torch.cat([x[:, :1], deep, x[:, 1 + deep.shape[1]:]], dim=1)
                x = blk(x, attn_mask=m.attn_mask)
        x = m.ln_final(x).float()
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        proj = m.text_projection
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj.float()
        return torch.nn.functional.normalize(x, dim=-1)


def _probabilities(emb: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(..., E) embeddings -> (..., 2) softmax over normal/abnormal."""
    logits = torch.nn.functional.normalize(emb.float(), dim=-1) @ text.T / TEMPERATURE
    return logits.softmax(dim=-1)


def patch_layers(n_blocks: int) -> tuple[int, ...]:
    """The blocks whose patch tokens are compared with the prompts: four evenly spaced, the
    last included, as the paper takes layers 6, 12, 18 and 24 of a 24-block ViT-L. Earlier
    blocks keep more of what is local; the last carries what the text was aligned with."""
    return tuple(sorted({max(1, round(n_blocks * q / 4)) for q in (1, 2, 3, 4)}))


def _dual_attention(blk: torch.nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One open_clip attention on normed tokens ``h`` (N, L, C), twice from the same projections:
    DPAM's value-value attention (softmax(v v^T / sqrt(d)) v) and the stock one (q k^T)."""
    attn = blk.attn
    n, length, c = h.shape
    heads = attn.num_heads
    qkv = torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, length, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def out(a: torch.Tensor) -> torch.Tensor:
        return attn.out_proj(a.transpose(1, 2).reshape(n, length, c))

    return out(sdpa(v, v, v)), out(sdpa(q, k, v))


def _image_and_patches(backbone: OpenCLIPBackbone, images: Sequence[np.ndarray],
                       design: PromptDesign | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected (B, E) image embeddings and (B, L, H, W, E) patch embeddings of a frozen
    pass: the tokens after each of :func:`patch_layers`' blocks, through ``ln_post`` and the
    image projection (the shared space with the text).

    With DPAM (``design.dpam_from``), the blocks from there on run two paths from one set of
    weights, as the paper does: the stock path (attention, then MLP) goes on to the class
    token, unchanged from CLIP; the DPAM path adds each block's value-value attention output
    (no MLP) to its own stream, computed from the stock path's normed tokens. Patch tokens
    are read from the DPAM path."""
    design = design or PromptDesign()
    visual = backbone.model.visual
    blocks = visual.transformer.resblocks
    keep = patch_layers(len(blocks))
    with torch.no_grad():
        x = visual._embeds(backbone.preprocess(list(images)).to(next(visual.parameters()).dtype))
        stock = None  # the stock path once DPAM has split it off
        outs = []
        for i, blk in enumerate(blocks, start=1):
            if design.dpam_from and i >= design.dpam_from:
                stock = x if stock is None else stock
                vv, ori = _dual_attention(blk, blk.ln_1(stock))
                x = x + blk.ls_1(vv)
                stock = stock + blk.ls_1(ori)
                stock = stock + blk.ls_2(blk.mlp(blk.ln_2(stock)))
            else:
                x = blk(x)
            if i in keep:
                outs.append(visual.ln_post(x).float() @ visual.proj.float())
        cls = (x if stock is None else stock)[:, 0]
        glob = (visual.ln_post(cls) if design.global_ln_post else cls).float() @ visual.proj.float()
        gh, gw = backbone.grid
        patches = torch.stack([o[:, 1:] for o in outs], dim=1)
        return glob, patches.reshape(patches.shape[0], len(keep), gh, gw, -1)


def prompt_separation(backbone: OpenCLIPBackbone, text: torch.Tensor, patches: torch.Tensor,
                      labels: torch.Tensor) -> float:
    """AUROC of the abnormal probability over patches (1 = defective patch): how well a
    pair of text directions tells defective patches from normal ones on this model."""
    from inference.eval_metrics import auroc

    p = _probabilities(patches, text)[..., 1].mean(dim=1)  # (B, H, W): mean over layers
    return float(auroc(labels.reshape(-1).cpu().numpy().astype(bool), p.reshape(-1).cpu().numpy()))


@dataclass
class TrainReport:
    losses: list[float]  # per step: global + local


def _focal(p: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    pt = torch.where(target > 0.5, p, 1 - p).clamp(1e-6, 1.0)
    return (-((1 - pt) ** gamma) * pt.log()).mean()


def _dice(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (p * target).sum(dim=(-1, -2))
    return (1 - (2 * inter + 1) / (p.sum(dim=(-1, -2)) + target.sum(dim=(-1, -2)) + 1)).mean()


def train_prompts(backbone: OpenCLIPBackbone, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                  *, steps: int = 200, lr: float = 1e-3, batch_size: int = 8,
                  design: PromptDesign | None = None, seed: int = 0,
                  on_step: Callable[[int, float], object] | None = None
                  ) -> tuple[PromptLearner, TrainReport]:
    """Learn the prompts of ``design`` (default: :func:`paper_design`) on an auxiliary set
    (RGB images, (H, W) boolean masks; an all-false mask is a normal image). The backbone
    stays frozen: its features are computed once, then only the text side runs per step."""
    if len(images) != len(masks) or not images:
        raise ValueError(f"train_prompts: {len(images)} images and {len(masks)} masks")
    import cv2

    backbone.model.requires_grad_(False)  # frozen: gradients reach only the prompts
    learner = PromptLearner(backbone, design or paper_design(backbone), seed=seed)
    g, p = [], []
    for i in range(0, len(images), batch_size):
        gi, pi = _image_and_patches(backbone, images[i:i + batch_size], learner.design)
        g.append(gi)
        p.append(pi)
    glob, patches = torch.cat(g), torch.cat(p)  # (N, E), (N, L, H, W, E)
    gh, gw = patches.shape[2:4]
    target = torch.from_numpy(np.stack([
        cv2.resize(m.astype(np.float32), (gw, gh), interpolation=cv2.INTER_AREA) for m in masks]))
    label = (target.flatten(1).amax(dim=1) > 0).long()
    opt = torch.optim.Adam(learner.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        idx = torch.from_numpy(rng.choice(len(images), min(batch_size, len(images)), replace=False))
        text = learner(backbone)
        image_loss = torch.nn.functional.cross_entropy(
            torch.nn.functional.normalize(glob[idx], dim=-1) @ text.T / TEMPERATURE, label[idx])
        prob = _probabilities(patches[idx], text)[..., 1]  # (b, L, H, W): each layer's map
        t = target[idx][:, None].expand_as(prob)
        loss = image_loss + _focal(prob, t) + _dice(prob, t) + _dice(1 - prob, 1 - t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    return learner, TrainReport(losses)


# -- storing prompts: safetensors only ------------------------------------------------------
def save_prompts(learner: PromptLearner, path: str | Path, arch: str) -> None:
    from safetensors.torch import save_file

    tensors = {"normal_ctx": learner.normal_ctx, "abnormal_ctx": learner.abnormal_ctx}
    tensors |= {f"deep.{i}": t for i, t in enumerate(learner.deep)}
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT, "arch": arch, "design": json.dumps(asdict(learner.design))})


def load_prompts(backbone: OpenCLIPBackbone, path: str | Path) -> PromptLearner:
    """A prompt file (safetensors) for ``backbone``; wrong width, keys or design is a PromptError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PromptError(f"--prompts {path} does not exist (train it with `linewatch "
                          "train-prompts`, or convert a checkpoint with --convert)")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            meta = f.metadata() or {}
    except Exception as exc:
        raise PromptError(f"--prompts {path} is not a safetensors file ({exc}); convert a torch "
                          "checkpoint with `linewatch train-prompts --convert`") from None
    if meta.get("format") not in (FORMAT, "linewatch-anomalyclip-1"):
        raise PromptError(f"--prompts {path} is not a linewatch prompt file (format "
                          f"{meta.get('format')!r})")
    if meta.get("arch") != backbone.arch:
        raise PromptError(f"--prompts {path} was learned for openclip:{meta.get('arch')}, not "
                          f"openclip:{backbone.arch}: prompts live in one model's text space")
    design = PromptDesign(n_ctx=_context_length(tensors, "normal_ctx", str(path)))
    if meta.get("format") == FORMAT:
        try:
            given = json.loads(meta["design"])
            names = {f.name: f.type for f in fields(PromptDesign)}
            if not isinstance(given, dict) or set(given) != set(names) or not all(
                    isinstance(v, bool) if names[k] == "bool" else type(v) is int for k, v in given.items()):
                raise TypeError(f"expected an object with the fields {sorted(names)}")
            design = PromptDesign(**given)
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise PromptError(f"--prompts {path}: its design metadata is unreadable ({exc})") from None
    return _learner_from(backbone, tensors, str(path), design)


def _plain_float(t: torch.Tensor) -> bool:
    """A dense CPU tensor of an ordinary float type (not sparse, meta, int, bool, complex, fp8)."""
    return (t.layout == torch.strided and t.device.type == "cpu"
            and t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64))


def _context_length(tensors: dict[str, torch.Tensor], key: str, where: str) -> int:
    t = tensors.get(key)
    if t is None or t.ndim != 2 or not t.shape[0]:
        raise PromptError(f"{where}: no {key} tensor of shape (tokens, width) (found "
                          f"{ {k: tuple(v.shape) for k, v in list(tensors.items())[:8]} })")
    return int(t.shape[0])


def _learner_from(backbone: OpenCLIPBackbone, tensors: dict[str, torch.Tensor], where: str,
                  design: PromptDesign) -> PromptLearner:
    """A learner of ``design`` holding exactly ``tensors`` (contexts and deep prompts, float)."""
    design.check(backbone, where)  # first: the expected names below are bounded by the model
    expected = {"normal_ctx", "abnormal_ctx"} | {f"deep.{i}" for i in range(design.deep_depth - 1)}
    if set(tensors) != expected:
        raise PromptError(f"{where}: expected tensors {sorted(expected)} for its design "
                          f"({design}), found {sorted(tensors)[:12]}")
    n, a = tensors["normal_ctx"], tensors["abnormal_ctx"]
    width = backbone.model.token_embedding.weight.shape[1]
    if n.ndim != 2 or n.shape != a.shape or n.shape[1] != width or n.shape[0] != design.n_ctx:
        raise PromptError(f"{where}: contexts of shape {tuple(n.shape)} / {tuple(a.shape)} do not fit "
                          f"openclip:{backbone.arch} (token width {width}) and {design.n_ctx} tokens")
    deep = [tensors[f"deep.{i}"] for i in range(design.deep_depth - 1)]
    if any(tuple(t.shape) != (design.deep_length, width) for t in deep):
        raise PromptError(f"{where}: deep prompts of shapes {[tuple(t.shape) for t in deep]}, expected "
                          f"({design.deep_length}, {width}) each")
    if not all(_plain_float(t) and bool(torch.isfinite(t.float()).all()) for t in tensors.values()):
        raise PromptError(f"{where}: prompts must be finite float16/bfloat16/float32/float64 tensors")
    learner = PromptLearner(backbone, design)
    with torch.no_grad():
        learner.normal_ctx.copy_(n)
        learner.abnormal_ctx.copy_(a)
        for p, t in zip(learner.deep, deep, strict=True):
            p.copy_(t)
    return learner


# What AnomalyCLIP's train.py saves, {"prompt_learner": state_dict} and nothing else: the
# contexts ctx_pos / ctx_neg (n_cls, n_templates, n_ctx, width), the deep prompts
# compound_prompts_text.{i}, one compound_prompt_projections.{i} per deep prompt (a
# projection its forward never applies: checked for count, then skipped), and persistent
# buffers derived from its tokenizer and CLIP (checked against ours, then dropped).
_BUFFERS = ("token_prefix_pos", "token_suffix_pos", "token_prefix_neg", "token_suffix_neg",
            "tokenized_prompts_pos", "tokenized_prompts_neg")


def convert_checkpoint(src: str | Path, dst: str | Path, backbone: OpenCLIPBackbone,
                       dpam_from: int | None = None) -> PromptLearner:
    """A torch checkpoint of prompts -> a safetensors prompt file. Read with
    ``weights_only=True`` (tensors and plain containers only: no code runs).

    AnomalyCLIP's own checkpoints (``ctx_pos`` / ``ctx_neg``) get its code's design: their
    deep prompts, DPAM from ``dpam_from`` (default: :func:`paper_dpam_from`; AnomalyCLIP's
    test.py runs DPAM_layer=20, block 6 of 24) and the class token without ``ln_post``. The
    prompt tokens and token embeddings stored beside them must be this backbone's, and its
    MLPs must be QuickGELU like OpenAI's CLIP they were learned on: prompts learned in another
    CLIP's text space would load and score nonsense. A checkpoint that is not exactly what
    that code writes is refused, never half-loaded."""
    try:
        sd = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PromptError(f"{src}: not a weights-only torch checkpoint "
                          f"({type(exc).__name__}: {exc})") from None
    for wrapper in ("prompt_learner", "state_dict"):  # AnomalyCLIP saves {"prompt_learner": ...}
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            if set(sd) != {wrapper}:
                raise PromptError(f"{src}: holds {sorted(map(str, sd))}, not only {wrapper!r}: "
                                  "the other parts would be dropped")
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise PromptError(f"{src}: expected a mapping of tensors")
    flat: dict[str, object] = {}

    def walk(d: dict, prefix: str = "") -> None:
        for k, v in d.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(f"{prefix}{k}", v)

    try:
        walk(sd)
    except RecursionError:
        raise PromptError(f"{src}: nested too deeply to be a prompt checkpoint") from None
    for k, v in flat.items():
        if not isinstance(v, torch.Tensor):
            raise PromptError(f"{src}: {k} is a {type(v).__name__}, not a tensor")
        if v.layout != torch.strided or v.device.type != "cpu":
            raise PromptError(f"{src}: {k} is a {v.layout} tensor on {v.device}, not a dense one")
    learned = [k for k in flat if k in ("normal_ctx", "abnormal_ctx", "ctx_pos", "ctx_neg")
               or k.startswith("compound_prompts_text.")]
    for k in learned:
        if not _plain_float(flat[k]):  # type: ignore[arg-type]
            raise PromptError(f"{src}: {k} is {flat[k].dtype}, not a float tensor")  # type: ignore[union-attr]
    tensors: dict[str, torch.Tensor] = flat  # type: ignore[assignment]
    ours = {"normal_ctx", "abnormal_ctx"}
    if ours <= set(tensors):
        if set(tensors) != ours:
            raise PromptError(f"{src}: unexpected tensors {sorted(set(tensors) - ours)}")
        if dpam_from:
            raise PromptError(f"{src} holds contexts only, learned without DPAM: DPAM from block "
                              f"{dpam_from} would score with features they never saw")
        design = PromptDesign(n_ctx=_context_length(tensors, "normal_ctx", str(src)))
        learner = _learner_from(backbone, {k: v.float() for k, v in tensors.items()}, str(src), design)
        save_prompts(learner, dst, backbone.arch)
        return learner
    if not {"ctx_pos", "ctx_neg"} <= set(tensors):
        raise PromptError(f"{src}: no ctx_pos / ctx_neg (AnomalyCLIP) or normal_ctx / abnormal_ctx "
                          f"tensors (found {sorted(tensors)[:8]})")
    missing = [b for b in _BUFFERS if b not in tensors]
    if missing:
        raise PromptError(f"{src}: lacks {missing}, which AnomalyCLIP's prompt learner always saves: "
                          "not one of its checkpoints, or an edited one")
    deep = [k for k in tensors if k.startswith("compound_prompts_text.")]
    if sorted(deep) != sorted(f"compound_prompts_text.{i}" for i in range(len(deep))):
        raise PromptError(f"{src}: deep prompts {sorted(deep)[:6]} are not numbered 0 .. {len(deep) - 1}")
    deep = [f"compound_prompts_text.{i}" for i in range(len(deep))]
    projections = {f"compound_prompt_projections.{i}.{p}"
                   for i in range(len(deep)) for p in ("weight", "bias")}
    unknown = sorted(set(tensors) - {"ctx_pos", "ctx_neg", *deep, *_BUFFERS, *projections})
    if unknown or not projections <= set(tensors):
        raise PromptError(f"{src}: expected {len(deep)} deep prompts with one projection each and "
                          f"nothing else; {'found ' + str(unknown[:6]) if unknown else 'projections missing'}"
                          ": refused rather than half-loaded")
    _require_quick_gelu(backbone, str(src))

    def context(key: str) -> torch.Tensor:
        t = tensors[key]
        while t.ndim > 2 and t.shape[0] == 1:  # (n_cls=1, n_templates=1, n_ctx, width)
            t = t[0]
        if t.ndim != 2 or not t.shape[0]:
            raise PromptError(f"{src}: {key} of shape {tuple(tensors[key].shape)}: linewatch uses one "
                              "context per prompt (AnomalyCLIP's object-agnostic single class)")
        return t.float()

    if any(tensors[k].ndim != 2 for k in deep):
        raise PromptError(f"{src}: deep prompts of shapes {[tuple(tensors[k].shape) for k in deep]}, "
                          "expected (tokens, width)")
    n_ctx = context("ctx_pos").shape[0]
    design = replace(paper_design(backbone), n_ctx=n_ctx, deep_depth=len(deep) + 1,
                     deep_length=tensors[deep[0]].shape[0] if deep else 0,
                     dpam_from=paper_dpam_from(backbone) if dpam_from is None else dpam_from)
    learner = _learner_from(
        backbone, {"normal_ctx": context("ctx_pos"), "abnormal_ctx": context("ctx_neg")}
        | {f"deep.{i}": tensors[k].float() for i, k in enumerate(deep)}, str(src), design)
    _check_buffers(tensors, learner, backbone, str(src))
    save_prompts(learner, dst, backbone.arch)
    return learner


def _require_quick_gelu(backbone: OpenCLIPBackbone, where: str) -> None:
    """AnomalyCLIP's code builds OpenAI's CLIP, whose MLPs use QuickGELU; open_clip builds GELU
    unless the architecture says otherwise, and the same weights then compute other features
    (the token embeddings checked against the checkpoint would not show it)."""
    towers = (backbone.model.transformer, backbone.model.visual.transformer)
    acts = {type(blk.mlp.gelu).__name__ for tower in towers
            for blk in tower.resblocks if hasattr(getattr(blk, "mlp", None), "gelu")}
    if acts != {"QuickGELU"}:
        raise PromptError(f"{where}: AnomalyCLIP's prompts were learned on OpenAI's CLIP, whose MLPs "
                          f"use QuickGELU; openclip:{backbone.arch} uses {sorted(acts) or 'other blocks'}: "
                          f"use openclip:{backbone.arch}-quickgelu (e.g. ViT-L-14-336-quickgelu)")


def _check_buffers(tensors: dict[str, torch.Tensor], learner: PromptLearner,
                   backbone: OpenCLIPBackbone, where: str) -> None:
    """The checkpoint's prompt tokens and their embeddings must be what this backbone makes of
    linewatch's two prompts."""
    n = learner.n_ctx
    width = backbone.model.token_embedding.weight.shape[1]
    for i, side in enumerate(("pos", "neg")):
        tokens = tensors[f"tokenized_prompts_{side}"].reshape(-1)
        want = learner.tokens[i].long()
        if tokens.shape != want.shape or not torch.equal(tokens.long(), want):
            raise PromptError(f"{where}: its {'abnormal' if i else 'normal'} prompt's tokens are not "
                              f"'{TEMPLATES[i].format(' '.join(['X'] * n))}' under this tokenizer")
        with torch.no_grad():
            emb = backbone.model.token_embedding(learner.tokens[i:i + 1]).float()[0]
        for part, ours in (("prefix", emb[:1]), ("suffix", emb[1 + n:])):
            theirs = tensors[f"token_{part}_{side}"]
            if theirs.numel() != ours.numel() or not theirs.is_floating_point():
                raise PromptError(f"{where}: token_{part}_{side} of shape {tuple(theirs.shape)}, expected "
                                  f"{ours.shape[0]} x {width} embeddings")
            theirs = theirs.reshape(-1, width).float()
            scale = float(ours.abs().max()) or 1.0
            if not float((theirs - ours).abs().max()) <= 1e-2 * scale:  # NaN fails too
                raise PromptError(f"{where}: its stored token embeddings ({part}) differ from "
                                  f"openclip:{backbone.arch}'s with these weights: the prompts were "
                                  "learned on another CLIP")


class AnomalyCLIPScorer:
    """Zero-shot scoring with learned object-agnostic prompts (see the module doc).

    Image score: the mean of the image embedding's abnormal probability and the map's
    maximum (AnomalyCLIP's test.py scores images by the first alone; the maximum is added
    so that a small defect the image embedding misses still raises the score, which nothing
    here has measured with real weights); the map: each projected patch token's abnormal
    probability. References are not used (``fit`` only records that it was called), as for
    zero-shot WinCLIP.
    """

    name = "anomalyclip"

    def __init__(self, backbone: OpenCLIPBackbone, prompts: PromptLearner,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device)
        self.prompts = prompts.to(self.device).requires_grad_(False)
        with torch.no_grad():
            self.text = prompts(backbone)
        self.map_gate: float | None = None  # every map is computed: they cost nothing extra
        self._fitted = False

    memory_size = 0

    def fit(self, normals: Sequence[np.ndarray]) -> None:
        self._fitted = True

    def add_normals(self, normals: Sequence[np.ndarray]) -> None:
        return None

    def score(self, images: Sequence[np.ndarray]) -> list[ScoreResult]:
        if not self._fitted:
            raise NotFittedError("anomalyclip.score() called before fit()")
        if len(images) == 0:
            return []
        glob, patches = _image_and_patches(self.backbone, images, self.prompts.design)
        zs = _probabilities(glob, self.text)[:, 1]
        maps = _probabilities(patches, self.text)[..., 1].mean(dim=1)  # (B, H, W)
        image = (zs + maps.flatten(1).amax(dim=1)) / 2
        emb = torch.nn.functional.normalize(glob, dim=-1).cpu().numpy()
        return [ScoreResult(score=float(s), anomaly_map=m.cpu().numpy().astype(np.float32), embedding=e)
                for s, m, e in zip(image.tolist(), maps, emb, strict=True)]
