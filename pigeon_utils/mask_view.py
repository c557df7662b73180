"""Looking at masks: tokenize samples, compute their history / reference masks, draw them, inspect them live.

Pigeon's mask generation module (docs/algorithm.md §2) decides, token by token, what the personalization model sees of the
five history images (ratio α_h, ``hist_mask_ratio``) and of the reference image (ratio α_r,
``ref_mask_ratio``). This module turns those decisions into pictures:

* :func:`tokenize_samples` — the visual tokens of every image of some samples (one batched tokenizer call);
* :func:`compute_masks` — keep decisions for all of them in one batched call of
  :func:`pigeon_utils.masking.generate_keep_mask` (types ``mutual`` / ``random`` / ``none``);
* :func:`draw_overlay` / :func:`overlay_strip` — kept tokens framed green, masked ones shaded red;
* :class:`MaskInspector` — an ipywidgets panel (sample, α_h, α_r, mask type → counts and overlay), whose state
  can also be driven from code (:meth:`MaskInspector.set`), so tests check what it renders.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from pigeon_utils.keep import MASK_TYPES, generate_keep_mask
from pigeon_utils.masking import MutualMaskGenerator
from pigeon_utils.sequence import mask_layout

KEPT = (40, 200, 90)
MASKED = (200, 30, 30)


@dataclass
class TokenizedSample:
    """One sample's six images (5 history + reference) and their visual tokens."""

    sample: object  # pigeon_utils.data.Sample
    images: list  # 6 PIL images
    codes: list[Tensor]  # per image: code ids [n_k]
    patch_index: list[Tensor]  # per image: patch of each token (-1: a whole-image token)
    grid: tuple[int, int]
    patch_size: int

    @property
    def counts(self) -> list[int]:
        return [len(c) for c in self.codes]


def tokenize_samples(backbone, ds, samples: Sequence) -> list[TokenizedSample]:
    """Load and tokenize the 6 images of each sample with one tokenizer call."""
    images = [ds.load_image(i) for s in samples for i in s.iids]
    toks = backbone.tokenizer.tokenize(images)
    out = []
    for k, s in enumerate(samples):
        sl = slice(6 * k, 6 * k + 6)
        out.append(TokenizedSample(s, images[sl], toks.codes[sl], toks.patch_index[sl], tuple(toks.grid),
                                   toks.patch_size))
    return out


@torch.no_grad()
def compute_masks(backbone, items: Sequence[TokenizedSample], mask_type: str = "mutual",
                  hist_mask_ratio: float = 0.2, ref_mask_ratio: float = 0.5,
                  mask_generator: MutualMaskGenerator | None = None, seed: int = 0,
                  inference: bool = True) -> list[list[Tensor]]:
    """Keep decisions (bool, per image, per token) for each sample — one batched call for all samples.

    The reference's ``[IMG]`` / ``[/IMG]`` delimiters take part in the selection (as upstream) but are not
    returned: the result has one entry per visual token of each of the 6 images.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type={mask_type!r}: expected one of {MASK_TYPES}")
    lay = backbone.layout
    ml = mask_layout([[c + lay.visual_offset for c in it.codes[:5]] for it in items],
                     [it.codes[5] + lay.visual_offset for it in items], lay)
    ids, counts, position_ids, type_ids, padding = ml.ids, ml.counts, ml.position_ids, ml.type_ids, ml.padding_mask
    g = torch.Generator().manual_seed(int(seed))
    kw = {}
    if mask_type == "mutual":
        if mask_generator is None:
            raise ValueError("mask_type='mutual' needs a mask_generator")
        emb = backbone.lmm.get_input_embeddings()
        p = next(mask_generator.parameters())
        kw = dict(mask_generator=mask_generator, position_ids=position_ids.to(p.device),
                  token_embeds=emb(ids.to(emb.weight.device)).to(p.device, p.dtype))
        type_ids, padding = type_ids.to(p.device), padding.to(p.device)
        g = torch.Generator(device=p.device).manual_seed(int(seed))
    km = generate_keep_mask(mask_type, type_ids=type_ids, padding_mask=padding, ref_mask_ratio=ref_mask_ratio,
                            hist_mask_ratio=hist_mask_ratio, inference=inference, straight_through=False,
                            generator=g, **kw)
    hard = km.hard.cpu()
    out = []
    for b, c in enumerate(counts.tolist()):
        row = hard[b, : sum(c)].split(c)
        per = list(row[:5]) + [row[5][1:-1]]  # drop the delimiters of the reference
        out.append(per)
    return out


def draw_overlay(image, patch_index: Tensor, keep: Tensor | None, grid: tuple[int, int], patch_size: int,
                 scale: int = 3) -> Image.Image:
    """The image upscaled by `scale` with each token's patch framed green (kept) or shaded red (masked).

    Tokens with patch index -1 stand for the whole image (the toy's image token): a border shows their state.
    With ``keep=None`` every token is drawn as kept (to show where the tokens are).
    """
    img = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    shade = Image.new("RGBA", img.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(shade)
    keep = torch.ones(len(patch_index), dtype=torch.bool) if keep is None else keep.bool()
    ps = patch_size * scale * image.width // (grid[1] * patch_size)
    for idx, k in zip(patch_index.tolist(), keep.tolist()):
        if idx < 0:
            w = max(2, scale)
            d.rectangle([0, 0, img.width - 1, img.height - 1], outline=(*(KEPT if k else MASKED), 255), width=w)
            continue
        r, c = divmod(idx, grid[1])
        box = [c * ps, r * ps, (c + 1) * ps - 1, (r + 1) * ps - 1]
        if k:
            d.rectangle(box, outline=(*KEPT, 255), width=max(1, scale // 2))
        else:
            d.rectangle(box, fill=(*MASKED, 120), outline=(*MASKED, 255), width=1)
    return Image.alpha_composite(img.convert("RGBA"), shade).convert("RGB")


def overlay_strip(item: TokenizedSample, keeps: list[Tensor] | None = None, scale: int = 3,
                  gap: int = 6) -> Image.Image:
    """History 1–5 and the reference side by side, with their token overlays."""
    tiles = [draw_overlay(im, pi, None if keeps is None else kp, item.grid, item.patch_size, scale)
             for im, pi, kp in zip(item.images, item.patch_index, keeps or [None] * 6)]
    w = sum(t.width for t in tiles) + gap * 7  # 5 gaps between tiles, 2 more before the reference
    strip = Image.new("RGB", (w, tiles[0].height), (255, 255, 255))
    x = 0
    for k, t in enumerate(tiles):
        if k == 5:
            x += gap * 2  # set the reference apart
        strip.paste(t, (x, 0))
        x += t.width + gap
    return strip


def kept_counts(keeps: list[Tensor]) -> dict[str, int]:
    hist = keeps[:5]
    return {"history_kept": int(sum(int(k.sum()) for k in hist)), "history_total": int(sum(len(k) for k in hist)),
            "reference_kept": int(keeps[5].sum()), "reference_total": int(len(keeps[5]))}


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class MaskInspector:
    """An ipywidgets panel to explore masks: choose a sample, slide α_h and α_r, switch the mask type, and see
    the history and reference images with kept / masked tokens overlaid and the kept counts.

    ``inspector.widget`` is the panel (display it in a notebook). Its state can be set from code with
    :meth:`set`; :attr:`counts` and :attr:`overlay_png` are what it currently shows.
    DOM contract (used by the browser test): the panel has CSS class ``pigeon-mask-inspector``; controls
    ``pigeon-sample``, ``pigeon-hist-ratio``, ``pigeon-ref-ratio``, ``pigeon-mask-type``; outputs
    ``pigeon-kept-counts`` (HTML) and ``pigeon-overlay`` (PNG image).
    """

    def __init__(self, backbone, items: Sequence[TokenizedSample], mask_generator: MutualMaskGenerator | None,
                 hist_mask_ratio: float = 0.2, ref_mask_ratio: float = 0.5, mask_type: str = "mutual",
                 seed: int = 0, scale: int = 3):
        import ipywidgets as w

        if not items:
            raise ValueError("MaskInspector needs at least one tokenized sample")
        self.backbone, self.items, self.mask_generator = backbone, list(items), mask_generator
        self.seed, self.scale = seed, scale
        labels = [(f"#{k}: user {it.sample.uid}, target {it.sample.target}", k) for k, it in enumerate(self.items)]
        self.sample = w.Dropdown(options=labels, value=0, description="sample")
        self.hist_ratio = w.FloatSlider(value=hist_mask_ratio, min=0.0, max=1.0, step=0.1, description="α_h",
                                        readout_format=".1f", continuous_update=False)
        self.ref_ratio = w.FloatSlider(value=ref_mask_ratio, min=0.0, max=1.0, step=0.1, description="α_r",
                                       readout_format=".1f", continuous_update=False)
        self.mask_type = w.Dropdown(options=list(MASK_TYPES), value=mask_type, description="mask type")
        self.counts_html = w.HTML()
        self.overlay = w.Image(format="png")
        for ctl, cls in ((self.sample, "pigeon-sample"), (self.hist_ratio, "pigeon-hist-ratio"),
                         (self.ref_ratio, "pigeon-ref-ratio"), (self.mask_type, "pigeon-mask-type"),
                         (self.counts_html, "pigeon-kept-counts"), (self.overlay, "pigeon-overlay")):
            ctl.add_class(cls)
        self.widget = w.VBox([w.HBox([self.sample, self.mask_type]), w.HBox([self.hist_ratio, self.ref_ratio]),
                              self.counts_html, self.overlay])
        self.widget.add_class("pigeon-mask-inspector")
        for ctl in (self.sample, self.hist_ratio, self.ref_ratio, self.mask_type):
            ctl.observe(self._on_change, names="value")
        self.counts: dict[str, int] = {}
        self.overlay_png = b""
        self.refresh()

    def _on_change(self, _change=None) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Recompute the mask for the current settings and redraw."""
        item = self.items[self.sample.value]
        keeps = compute_masks(self.backbone, [item], self.mask_type.value, round(self.hist_ratio.value, 6),
                              round(self.ref_ratio.value, 6), self.mask_generator, seed=self.seed)[0]
        self.counts = kept_counts(keeps)
        c = self.counts
        self.counts_html.value = (f"<b>{self.mask_type.value}</b> masks · α_h = {self.hist_ratio.value:.1f}, "
                                  f"α_r = {self.ref_ratio.value:.1f} · history kept {c['history_kept']} / "
                                  f"{c['history_total']} · reference kept {c['reference_kept']} / "
                                  f"{c['reference_total']}")
        self.overlay_png = png_bytes(overlay_strip(item, keeps, scale=self.scale))
        self.overlay.value = self.overlay_png

    def set(self, sample: int | None = None, hist_mask_ratio: float | None = None,
            ref_mask_ratio: float | None = None, mask_type: str | None = None) -> None:
        """Change settings from code, exactly as moving the controls would."""
        if mask_type is not None and mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type={mask_type!r}: expected one of {MASK_TYPES}")
        for ctl, v in ((self.sample, sample), (self.hist_ratio, hist_mask_ratio), (self.ref_ratio, ref_mask_ratio),
                       (self.mask_type, mask_type)):
            if v is not None:
                ctl.value = v


def kept_vs_ratio(backbone, items: Sequence[TokenizedSample], ratios: Sequence[float], mask_type: str = "mutual",
                  mask_generator: MutualMaskGenerator | None = None, hist_mask_ratio: float = 0.2,
                  seed: int = 0) -> np.ndarray:
    """Mean fraction of reference tokens kept at each α_r (rows: ratios), over `items`."""
    out = []
    for r in ratios:
        keeps = compute_masks(backbone, items, mask_type, hist_mask_ratio, float(r), mask_generator, seed=seed)
        out.append(np.mean([float(k[5].float().mean()) if len(k[5]) else 0.0 for k in keeps]))
    return np.asarray(out)


def nested_fraction(backbone, items: Sequence[TokenizedSample], ratios: Sequence[float],
                    mask_generator: MutualMaskGenerator | None = None, hist_mask_ratio: float = 0.2,
                    seed: int = 0) -> float:
    """Fraction of (sample, consecutive α_r pair) for which the reference tokens kept at the higher α_r are a
    subset of those kept at the lower one, with the same seeded noise (mutual masks)."""
    prev, hits, total = None, 0, 0
    for r in sorted(ratios):
        ref = [k[5] for k in compute_masks(backbone, items, "mutual", hist_mask_ratio, float(r), mask_generator,
                                           seed=seed)]
        if prev is not None:
            hits += sum(bool((~p & c).sum() == 0) for p, c in zip(prev, ref))
            total += len(ref)
        prev = ref
    return hits / max(total, 1)


def load_mask_generator(backbone, cfg, folder=None) -> tuple[MutualMaskGenerator, str]:
    """The mask generator to look at: from a model `folder` (:mod:`pigeon_utils.checkpoints`) when given, else
    ``run_dir/sft/best`` when present, else a freshly initialised one of the preset's Stage-1 configuration (seeded
    by ``cfg.seed``) — which is what the reference code effectively uses, since it never trains it
    (docs/algorithm.md §2.8)."""
    from pigeon_utils.checkpoints import MODEL_CONFIG_FILE, load_mask_generator as load_trained_generator
    from pigeon_utils.sft import SFTConfig

    dim = backbone.lmm.get_input_embeddings().weight.shape[1]
    path = Path(folder) if folder else cfg.run_dir / "sft" / "best"
    torch.manual_seed(cfg.seed)
    if folder or (path / MODEL_CONFIG_FILE).is_file():
        return load_trained_generator(path, dim), str(path)
    gen = SFTConfig.for_preset(cfg.preset).model.build_mask_generator(dim)
    return gen.eval(), f"initialised from seed {cfg.seed} (untrained)"
