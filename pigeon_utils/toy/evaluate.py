"""The toy backbone's figures (issue 3 "Must show"), shared by the build (recorded in ``manifest.json``) and by
``bench/bench_toy_backbone.py`` (recomputed from the committed checkpoint).

* :func:`clip_accuracy` — toy CLIP zero-shot accuracy on held-out images (semantic = glyph; style = colour,
  pattern, stroke).
* :func:`round_trip` — image -> tokens -> detokenizer -> pixel decoder, judged by the toy CLIP; token-count stats.
* :func:`caption_generation` — caption -> visual tokens with the pre-trained LMM (under the backbone's logits
  processor) -> image, on caption combinations held out of the LMM's pre-training.
* :func:`in_context_style` — a few images sharing a style, then ``a <glyph>``: does the LMM draw the glyph in
  the style it saw (no text names the style)? What Pigeon's history needs.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import numpy as np
import torch

from pigeon_utils.toy.clip import ToyClip, factor_accuracy


def fresh_images(combos: Sequence[tuple[str, str, str, str]], n: int, seed: int):
    """`n` fresh renders cycling through `combos` with random jitter -> (uint8 [n, 64, 64, 3], factor dicts)."""
    from pigeon_utils.toy_data import random_factors, render

    rng = np.random.default_rng(seed)
    fs = [random_factors(rng, *combos[i % len(combos)]) for i in range(n)]
    return np.stack([np.asarray(render(f)) for f in fs]), [asdict(f) for f in fs]


def clip_accuracy(clip: ToyClip, images, factors: list[dict]) -> dict[str, float]:
    return factor_accuracy(clip.predict_factors(images), factors)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def decode_in_batches(backbone, codes: list[torch.Tensor], seed: int, batch: int = 128) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return np.concatenate([_to_uint8(backbone.decode_codes(codes[i:i + batch], generator=gen))
                           for i in range(0, len(codes), batch)])


def round_trip(backbone, clip: ToyClip, images: np.ndarray, factors: list[dict], seed: int) -> dict:
    tokens = backbone.tokenizer.tokenize(images)
    counts = tokens.counts.float()
    decoded = decode_in_batches(backbone, tokens.codes, seed)
    preview = backbone.tokenizer.render_codes(tokens.codes).numpy()
    return {"decoded": clip_accuracy(clip, decoded, factors),
            "centroid_preview": clip_accuracy(clip, preview, factors),
            "tokens_per_image": {"min": int(counts.min()), "mean": float(counts.mean()), "max": int(counts.max()),
                                 "std": float(counts.std()), "distinct_counts": int(counts.unique().numel())},
            "_decoded_images": decoded}


def caption_generation(backbone, clip: ToyClip, combos: Sequence[tuple[str, str, str, str]], per_combo: int,
                       seed: int, top_k: int = 50, temperature: float = 1.0) -> dict:
    """Generate ``per_combo`` images for each held-out caption combination and judge them with the toy CLIP."""
    from pigeon_utils.toy.lmm import generate_images_codes
    from pigeon_utils.toy_data import ToyFactors

    truth = [dict(zip(("glyph", "colour", "pattern", "stroke"), c)) for c in combos for _ in range(per_combo)]
    captions = [ToyFactors(**t).caption() for t in truth]
    codes = generate_images_codes(backbone.lmm, backbone.text_tokenizer, backbone.layout,
                                  backbone.visual_logits_processor(), captions, gen_seed=seed, top_k=top_k,
                                  temperature=temperature)
    images = decode_in_batches(backbone, codes, seed)
    acc = clip_accuracy(clip, images, truth)
    lengths = torch.tensor([len(c) for c in codes]).float()
    return {"n_images": len(codes), "n_combos": len(combos), "accuracy": acc,
            "tokens_per_image": {"min": int(lengths.min()), "mean": float(lengths.mean()), "max": int(lengths.max())},
            "sampling": {"top_k": top_k, "temperature": temperature}, "_images": images, "_captions": captions}


@torch.no_grad()
def in_context_style(backbone, clip: ToyClip, combos: Sequence[tuple[str, str, str, str]], n_context: int,
                     seed: int, top_k: int = 50, temperature: float = 1.0) -> dict:
    """For each combination (glyph, colour, pattern, stroke): `n_context` images in its style with other glyphs,
    uncaptioned, then ``a <glyph> [IMG]``; the LMM generates, the toy CLIP judges. Style accuracy far above
    chance (colour 1/8, pattern 1/4, stroke 1/2) means the LMM reads style from its visual context."""
    from pigeon_utils.toy.lmm import generate_codes, image_span
    from pigeon_utils.toy_data import GLYPHS, random_factors, render

    rng = np.random.default_rng(seed)
    layout, text_tok = backbone.layout, backbone.text_tokenizer
    context = [random_factors(rng, [x for x in GLYPHS if x != g][int(rng.integers(len(GLYPHS) - 1))], c, p, s)
               for g, c, p, s in combos for _ in range(n_context)]
    codes = backbone.tokenizer.tokenize(np.stack([np.asarray(render(f)) for f in context])).codes
    prompts = []
    for i, (g, *_style) in enumerate(combos):  # one prompt per combination
        spans = [image_span(c, layout) for c in codes[i * n_context:(i + 1) * n_context]]
        prompts.append([text_tok.bos_token_id] + torch.cat(spans).tolist()
                       + text_tok(f"a {g}", add_special_tokens=False)["input_ids"] + [layout.img_id])
    out = generate_codes(backbone.lmm, layout, backbone.visual_logits_processor(), prompts, seed, top_k, temperature)
    images = decode_in_batches(backbone, out, seed)
    truth = [dict(zip(("glyph", "colour", "pattern", "stroke"), c)) for c in combos]
    return {"n_images": len(out), "n_context": n_context, "accuracy": clip_accuracy(clip, images, truth),
            "sampling": {"top_k": top_k, "temperature": temperature}, "_images": images}


def public(d: dict) -> dict:
    """Drop the ``_``-prefixed (array) entries, recursively, for JSON."""
    return {k: public(v) if isinstance(v, dict) else v for k, v in d.items() if not k.startswith("_")}
