"""AnomalyCLIP (Zhou et al., ICLR 2024): object-agnostic learned prompts, for users with CLIP weights.

WinCLIP asks CLIP about "a photo of a damaged bottle" with hand-written prompt
ensembles. AnomalyCLIP learns the prompt instead, and learns it *object-agnostic*:
two sequences of learnable word embeddings, one before "object." (normal) and one
before "damaged object." (abnormal), trained once on an auxiliary dataset with
defect masks and then used on any product, zero-shot. What is learned is
"normal versus abnormal", not what a bottle looks like.

Built here: the prompt learner (:class:`PromptLearner`, the two contexts run through
CLIP's own frozen text transformer), scoring with it (:class:`AnomalyCLIPScorer`: the
abnormal-prompt probability of the image embedding, and of each projected patch token
for the map), and training (:func:`train_prompts`: the paper's global image-level loss,
cross-entropy on normal/defective, plus its local pixel-level losses, focal and dice on
the patch map against the masks). Prompts are stored as safetensors
(:func:`save_prompts`, :func:`load_prompts`); a torch checkpoint of prompts is read with
``weights_only`` and converted (:func:`convert_checkpoint`), never unpickled.

Not built (the paper has them; say so where it matters): learnable tokens inside the
text encoder's layers ("deep" prompts) and DPAM, the diagonal attention the paper
puts into the image encoder's later layers so that patch tokens keep local meaning.
Without DPAM, patch maps of a stock CLIP are weaker than the paper's; a released
AnomalyCLIP checkpoint that carries deep prompts is refused, not half-loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.clip import OpenCLIPBackbone
from inference.scoring import NotFittedError, ScoreResult

TEMPLATES = ("{} object.", "{} damaged object.")  # normal, abnormal; {} = the learned context
N_CTX = 12
TEMPERATURE = 0.07


class PromptError(ValueError):
    """A prompt file that cannot be used with this backbone (shape, keys, format)."""


class PromptLearner(torch.nn.Module):
    """Two learnable contexts (``n_ctx`` word embeddings each) in front of "object." and
    "damaged object.", encoded by the backbone's frozen text transformer."""

    def __init__(self, backbone: OpenCLIPBackbone, n_ctx: int = N_CTX, seed: int = 0) -> None:
        super().__init__()
        model = backbone.model
        width = model.token_embedding.weight.shape[1]
        gen = torch.Generator().manual_seed(seed)
        self.normal_ctx = torch.nn.Parameter(torch.randn(n_ctx, width, generator=gen) * 0.02)
        self.abnormal_ctx = torch.nn.Parameter(torch.randn(n_ctx, width, generator=gen) * 0.02)
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
        self.n_ctx = n_ctx

    def forward(self, backbone: OpenCLIPBackbone) -> torch.Tensor:
        """(2, E) unit text directions: normal, abnormal (differentiable in the contexts)."""
        from open_clip.transformer import text_global_pool

        m = backbone.model
        tokens = self.tokens.to(m.token_embedding.weight.device)
        emb = m.token_embedding(tokens).float()
        ctx = torch.stack([self.normal_ctx, self.abnormal_ctx]).to(emb)
        x = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.n_ctx:]], dim=1)
        dtype = m.transformer.get_cast_dtype()
        x = (x + m.positional_embedding.float()).to(dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask)).float()
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


def _image_and_patches(backbone: OpenCLIPBackbone, images: Sequence[np.ndarray]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected (B, E) image embeddings and (B, L, H, W, E) patch embeddings of a frozen
    pass: the tokens after each of :func:`patch_layers`' blocks, through ``ln_post`` and the
    image projection (the shared space with the text)."""
    visual = backbone.model.visual
    blocks = visual.transformer.resblocks
    keep = patch_layers(len(blocks))
    with torch.no_grad():
        x = visual._embeds(backbone.preprocess(list(images)).to(next(visual.parameters()).dtype))
        outs = []
        for i, blk in enumerate(blocks, start=1):
            x = blk(x)
            if i in keep:
                outs.append(visual.ln_post(x).float() @ visual.proj.float())
        gh, gw = backbone.grid
        glob = outs[-1][:, 0]
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
                  *, steps: int = 200, lr: float = 1e-3, batch_size: int = 8, n_ctx: int = N_CTX,
                  seed: int = 0, on_step: Callable[[int, float], object] | None = None
                  ) -> tuple[PromptLearner, TrainReport]:
    """Learn the two contexts on an auxiliary set (RGB images, (H, W) boolean masks; an
    all-false mask is a normal image). The backbone stays frozen: its features are
    computed once, then only the text side runs per step."""
    if len(images) != len(masks) or not images:
        raise ValueError(f"train_prompts: {len(images)} images and {len(masks)} masks")
    import cv2

    backbone.model.requires_grad_(False)  # frozen: gradients reach only the two contexts
    learner = PromptLearner(backbone, n_ctx=n_ctx, seed=seed)
    g, p = [], []
    for i in range(0, len(images), batch_size):
        gi, pi = _image_and_patches(backbone, images[i:i + batch_size])
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

    save_file({"normal_ctx": learner.normal_ctx.detach().contiguous(),
               "abnormal_ctx": learner.abnormal_ctx.detach().contiguous()},
              str(path), metadata={"format": "linewatch-anomalyclip-1", "arch": arch})


def load_prompts(backbone: OpenCLIPBackbone, path: str | Path) -> PromptLearner:
    """A prompt file (safetensors) for ``backbone``; wrong width or keys is a PromptError."""
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
    if meta.get("format") != "linewatch-anomalyclip-1":
        raise PromptError(f"--prompts {path} is not a linewatch prompt file (format "
                          f"{meta.get('format')!r})")
    if meta.get("arch") != backbone.arch:
        raise PromptError(f"--prompts {path} was learned for openclip:{meta.get('arch')}, not "
                          f"openclip:{backbone.arch}: prompts live in one model's text space")
    return _learner_from(backbone, tensors, str(path))


def _learner_from(backbone: OpenCLIPBackbone, tensors: dict[str, torch.Tensor], where: str) -> PromptLearner:
    if set(tensors) != {"normal_ctx", "abnormal_ctx"}:
        raise PromptError(f"{where}: expected tensors normal_ctx and abnormal_ctx, found "
                          f"{sorted(tensors)}")
    n, a = tensors["normal_ctx"], tensors["abnormal_ctx"]
    width = backbone.model.token_embedding.weight.shape[1]
    if n.ndim != 2 or n.shape != a.shape or n.shape[1] != width:
        raise PromptError(f"{where}: contexts of shape {tuple(n.shape)} / {tuple(a.shape)} do not fit "
                          f"openclip:{backbone.arch} (token width {width})")
    learner = PromptLearner(backbone, n_ctx=n.shape[0])
    with torch.no_grad():
        learner.normal_ctx.copy_(n)
        learner.abnormal_ctx.copy_(a)
    return learner


# AnomalyCLIP's released checkpoints name the contexts ctx_pos / ctx_neg (with leading
# singleton dimensions); its deep text-layer prompts are compound_prompts_text.*
_CHECKPOINT_NAMES = {"normal_ctx": ("normal_ctx", "ctx_pos", "prompt_learner.ctx_pos"),
                     "abnormal_ctx": ("abnormal_ctx", "ctx_neg", "prompt_learner.ctx_neg")}


def convert_checkpoint(src: str | Path, dst: str | Path, backbone: OpenCLIPBackbone) -> PromptLearner:
    """A torch checkpoint of prompt contexts -> a safetensors prompt file. Read with
    ``weights_only=True`` (tensors and plain containers only: no code runs). A checkpoint
    with deep prompts is refused: they would be silently dropped."""
    try:
        sd = torch.load(str(src), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PromptError(f"{src}: not a weights-only torch checkpoint "
                          f"({type(exc).__name__}: {exc})") from None
    for wrapper in ("prompt_learner", "state_dict"):  # AnomalyCLIP saves {"prompt_learner": ...}
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise PromptError(f"{src}: expected a mapping of tensors")

    def names(d: dict, prefix: str = "") -> list[str]:
        return [n for k, v in d.items() for n in
                (names(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])]

    deep = sorted(k for k in names(sd) if "compound_prompts" in k)
    if deep:
        raise PromptError(f"{src} carries deep text-layer prompts ({deep[0]}, ...), which linewatch's "
                          "AnomalyCLIP does not implement; loading only the input contexts would "
                          "score differently from what was trained")
    out = {}
    for name, aliases in _CHECKPOINT_NAMES.items():
        key = next((k for k in aliases if k in sd), None)
        if key is None:
            raise PromptError(f"{src}: no {' / '.join(aliases)} tensor (found {sorted(sd)[:8]})")
        t = sd[key]
        if not isinstance(t, torch.Tensor):
            raise PromptError(f"{src}: {key} is a {type(t).__name__}, not a tensor")
        while t.ndim > 2 and t.shape[0] == 1:
            t = t[0]
        out[name] = t.float()
    learner = _learner_from(backbone, out, str(src))
    save_prompts(learner, dst, backbone.arch)
    return learner


class AnomalyCLIPScorer:
    """Zero-shot scoring with learned object-agnostic prompts (see the module doc).

    Image score: the mean of the image embedding's abnormal probability and the map's
    maximum (the paper combines global and local the same way); the map: each projected
    patch token's abnormal probability. References are not used (``fit`` only records
    that it was called), as for zero-shot WinCLIP.
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
        glob, patches = _image_and_patches(self.backbone, images)
        zs = _probabilities(glob, self.text)[:, 1]
        maps = _probabilities(patches, self.text)[..., 1].mean(dim=1)  # (B, H, W)
        image = (zs + maps.flatten(1).amax(dim=1)) / 2
        emb = torch.nn.functional.normalize(glob, dim=-1).cpu().numpy()
        return [ScoreResult(score=float(s), anomaly_map=m.cpu().numpy().astype(np.float32), embedding=e)
                for s, m, e in zip(image.tolist(), maps, emb, strict=True)]
