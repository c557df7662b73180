"""What the toy build trains on besides fresh renders: the toy datasets' images, the style documents of the LMM's
copy phase, the semantics texts the toy CLIP also learns, and the meaning vectors the detokenizer's feature term
reconstructs. Each is drawn from its own seed, so the build is deterministic.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def dataset_images(data_dir: Path | None) -> tuple[list[np.ndarray], list[dict]]:
    """The toy datasets' images (uint8 [64, 64, 3] each) and factors; empty when `data_dir` lacks them."""
    from pigeon_utils.data import open_dataset

    ims, fs = [], []
    for name, scenario in (("toy-sticker", "sticker"), ("toy-poster", "movie")):
        root = None if data_dir is None else Path(data_dir) / name
        if root is None or not root.is_dir():
            continue
        d = open_dataset(root, scenario)
        ims += [np.asarray(d.load_image(i)) for i in range(d.n_items)]
        fs += list(d.factors)
    return ims, fs


def style_documents(combos, n_docs: int, n_images: tuple[int, int], keep: float, seed: int, workers: int = 1):
    """`n_docs` style documents: each draws a style (colour, pattern, stroke) and ``n_images[0] ≤ k < n_images[1]``
    images; every image keeps each style factor of its document with probability `keep` (else a random value) and
    a random glyph among those whose combination is in `combos` (held-out combinations never appear).
    Returns ``(uint8 images [N, 64, 64, 3], their factors, images per document)``."""
    from pigeon_utils.toy.data import COLOURS, GLYPHS, PATTERNS, STROKES, random_factors, render_many

    allowed = set(combos)
    rng = np.random.default_rng(seed)
    pick = lambda values: values[int(rng.integers(len(values)))]  # noqa: E731
    colours = list(COLOURS)
    fs, sizes = [], []
    for _ in range(n_docs):  # one per document (data generation, not a hot path)
        style = (pick(colours), pick(PATTERNS), pick(STROKES))
        k = int(rng.integers(n_images[0], n_images[1]))
        for _ in range(k):
            c, p, s = (v if rng.random() < keep else pick(pool)
                       for v, pool in zip(style, (colours, PATTERNS, STROKES)))
            glyphs = [g for g in GLYPHS if (g, c, p, s) in allowed]
            if not glyphs:  # every glyph of this style is held out: keep the document's style instead
                c, p, s = style
                glyphs = [g for g in GLYPHS if (g, c, p, s) in allowed] or list(GLYPHS)
            fs.append(random_factors(rng, pick(glyphs), c, p, s))
        sizes.append(k)
    return render_many(fs, workers), fs, sizes


def document_captions(factors, sizes: list[int], text_tok, p_caption: float, gen: torch.Generator):
    """Caption ids per document image: context images their full caption with probability `p_caption` (else
    None), the last image ``"a <glyph>"`` only — its style must come from the images before it."""
    if not factors:
        return []
    full = text_tok([f.caption() for f in factors], add_special_tokens=False)["input_ids"]
    short = text_tok([f"a {f.glyph}" for f in factors], add_special_tokens=False)["input_ids"]
    has = (torch.rand(len(factors), generator=gen) < p_caption).tolist()
    out, start = [], 0
    for k in sizes:  # one per document
        out.append([full[i] if has[i] else None for i in range(start, start + k - 1)] + [short[start + k - 1]])
        start += k
    return out


def document_ids(tokenizer, text_tok, layout, ims, factors, sizes: list[int], p_caption: float,
                 g: torch.Generator, delimit: bool = False) -> list:
    """Style documents (:func:`style_documents`) as LMM id segments: their images tokenized, split per document and
    captioned (:func:`document_captions`); with `delimit`, each between ``<s>`` and ``</s>``."""
    from pigeon_utils.toy.lmm import document_segments

    codes = tokenizer.tokenize(ims).codes if len(ims) else []
    ends = np.cumsum(sizes).tolist()
    delims = dict(bos_id=text_tok.bos_token_id, eos_id=text_tok.eos_token_id) if delimit else {}
    return document_segments([codes[e - k: e] for e, k in zip(ends, sizes)],
                             document_captions(factors, sizes, text_tok, p_caption, g), layout, **delims)


def semantics_pairs(factors: list[dict], fraction: float, seed: int) -> tuple[np.ndarray, list[str]]:
    """A random `fraction` of the pool's images (indices) with one of the toy semantics texts of their glyph, so
    the toy CLIP also knows the texts reference CS compares generated images with."""
    from pigeon_utils.toy.data import semantics_texts

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(factors), size=int(round(fraction * len(factors))), replace=False))
    texts = []
    for i in idx.tolist():  # one per chosen image
        options = semantics_texts(factors[i]["glyph"])
        texts.append(options[int(rng.integers(len(options)))])
    return idx, texts


def detokenizer_features(clip, images: np.ndarray, factors: list[dict]) -> Tensor:
    """The vectors the detokenizer's feature term reconstructs, one row per image: the unit toy CLIP image
    embedding next to the unit mean of the CLIP text embeddings of every semantics text the image's glyph can have
    (:func:`~pigeon_utils.toy.data.semantics_texts`) — what the image *means*, as LaVIT's decoder conditioning,
    built for text-to-image, carries meaning. See docs/toy-world.md."""
    from pigeon_utils.toy.data import GLYPHS, semantics_texts

    feats = clip.image_features(images)
    with torch.no_grad():
        meaning = {g: F.normalize(clip.text_features(semantics_texts(g)), dim=-1).mean(0) for g in GLYPHS}
    rows = F.normalize(torch.stack([meaning[f["glyph"]] for f in factors]), dim=-1)
    return torch.cat([F.normalize(feats, dim=-1), rows], dim=1)
