"""The toy backbone's figures (issue 3 "Must show"), shared by the build (recorded in ``manifest.json``) and by
``bench/bench_toy_backbone.py`` (recomputed from the committed checkpoint); :func:`compute_figures` gathers them
for a checkpoint folder.

* :func:`clip_accuracy` — toy CLIP zero-shot accuracy on held-out images (semantic = glyph; style = colour,
  pattern, stroke).
* :func:`round_trip` — image -> tokens -> detokenizer -> pixel decoder, judged by the toy CLIP; token-count stats.
* :func:`caption_generation` — caption -> visual tokens with the pre-trained LMM (under the backbone's logits
  processor) -> image, on caption combinations held out of the LMM's pre-training.
* :func:`context_copy` with :func:`copy_probes` — the in-context skill: after a few uncaptioned images in one
  style and ``a <glyph> [IMG]``, the probability the LMM gives to the image token those images share (their
  colour and background). Toy SFT reads the user's history when this is high (docs/toy-world.md).
* :func:`reference_embedding_probe` — a diagnostic, not a bar: how much of each factor a linear read-out finds in
  the detokenizer's mean output, which Pigeon's adapter turns into the reference embedding E.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import numpy as np
import torch

from pigeon_utils.backbone import to_uint8
from pigeon_utils.toy.clip import ToyClip, factor_accuracy


def fresh_images(combos: Sequence[tuple[str, str, str, str]], n: int, seed: int, workers: int = 1):
    """`n` fresh renders cycling through `combos` with random jitter -> (uint8 [n, 64, 64, 3], factor dicts);
    `workers` rendering processes (the same images whatever it is)."""
    from pigeon_utils.toy.data import random_factors, render_many

    rng = np.random.default_rng(seed)
    fs = [random_factors(rng, *combos[i % len(combos)]) for i in range(n)]
    return render_many(fs, workers), [asdict(f) for f in fs]


def clip_accuracy(clip: ToyClip, images, factors: list[dict]) -> dict[str, float]:
    return factor_accuracy(clip.predict_factors(images), factors)


@torch.no_grad()
def decode_in_batches(backbone, codes: list[torch.Tensor], seed: int, batch: int = 128) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    return np.concatenate([to_uint8(backbone.decode_codes(codes[i:i + batch], generator=gen))
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
    from pigeon_utils.toy.data import ToyFactors

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


def copy_probes(tokenizer, text_tok, layout, combos: Sequence[tuple[str, str, str, str]], n_context: int,
                seed: int) -> tuple[list[list[int]], torch.Tensor]:
    """One prompt per combination (glyph, colour, pattern, stroke): ``<s>``, `n_context` uncaptioned images in its
    style with other glyphs, then ``a <glyph> [IMG]``; and the LMM id of the image token of an image of the
    combination itself (the toy's image token is background tile × colour, so the context images share it)."""
    from pigeon_utils.toy.lmm import image_span
    from pigeon_utils.toy.data import GLYPHS, random_factors, render

    rng = np.random.default_rng(seed)
    glyphs = list(GLYPHS)
    fs = []
    for g, c, p, s in combos:  # one prompt per combination: its context images, then the combination itself
        others = [x for x in glyphs if x != g]
        fs += [random_factors(rng, others[int(rng.integers(len(others)))], c, p, s) for _ in range(n_context)]
        fs.append(random_factors(rng, g, c, p, s))
    codes = tokenizer.tokenize(np.stack([np.asarray(render(f)) for f in fs])).codes
    prompts, targets, k = [], [], n_context + 1
    for i, (g, *_style) in enumerate(combos):
        ctx = torch.cat([image_span(c, layout) for c in codes[i * k: i * k + n_context]]).tolist()
        prompts.append([text_tok.bos_token_id] + ctx + text_tok(f"a {g}", add_special_tokens=False)["input_ids"]
                       + [layout.img_id])
        targets.append(int(codes[i * k + n_context][0]) + layout.visual_offset)
    return prompts, torch.tensor(targets)


@torch.no_grad()
def context_copy(model, prompts: Sequence[Sequence[int]], targets: torch.Tensor, pad_id: int,
                 batch: int = 64) -> float:
    """Mean probability of ``targets[i]`` as the next token after ``prompts[i]`` (left-padded batches)."""
    from pigeon_utils.toy.lmm import left_padded

    probs = []
    for i in range(0, len(prompts), batch):
        ids, attn = left_padded(prompts[i:i + batch], pad_id, model.device)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, -1].float()
        tgt = targets[i:i + batch].to(logits.device)
        probs.append(logits.softmax(-1).gather(1, tgt[:, None])[:, 0].cpu())
    return float(torch.cat(probs).mean())


def linear_probe_accuracy(x: torch.Tensor, labels: torch.Tensor, n_train: int, steps: int = 300,
                          seed: int = 0) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted on the first `n_train` rows of `x` [N, D]
    (standardised with the training rows' statistics) to integer `labels` [N]; full-batch Adam."""
    if not 0 < n_train < len(x):
        raise ValueError(f"linear_probe_accuracy: n_train={n_train} must leave rows on both sides of {len(x)}")
    x = x.float()
    mu, sd = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    x = (x - mu) / sd
    k = int(labels.max()) + 1
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(x.shape[1], k, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(k, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(x[:n_train] @ w + b, labels[:n_train]).backward()
            opt.step()
    with torch.no_grad():
        return float(((x[n_train:] @ w + b).argmax(1) == labels[n_train:]).float().mean())


@torch.no_grad()
def reference_embedding_probe(backbone, images: np.ndarray, factors: list[dict], n_train: int) -> dict[str, float]:
    """Per factor, the held-out accuracy of a linear read-out from the detokenizer's mean conditioning row of each
    image's tokens: what the reference embedding E (adapter of that mean, docs/algorithm.md §3.2) can carry of the
    image."""
    from pigeon_utils.backbone import pad_codes

    codes, mask = pad_codes(backbone.tokenizer.tokenize(images).codes)
    x = torch.cat([backbone.detokenizer(codes[i:i + 512], mask[i:i + 512])[0].mean(1)
                   for i in range(0, len(codes), 512)])
    out = {}
    for name in ("glyph", "colour", "pattern", "stroke"):
        values = sorted({f[name] for f in factors})
        labels = torch.tensor([values.index(f[name]) for f in factors])
        out[name] = linear_probe_accuracy(x, labels, n_train)
    return out


def public(d: dict) -> dict:
    """Drop the ``_``-prefixed (array) entries, recursively, for JSON."""
    return {k: public(v) if isinstance(v, dict) else v for k, v in d.items() if not k.startswith("_")}


def compute_figures(folder, cfg) -> dict:
    """The "Must show" figures of the checkpoint in `folder`, built with the recipe `cfg`
    (:class:`~pigeon_utils.toy.recipe.BuildConfig`: its seed, held-out combinations and evaluation sizes)."""
    from pigeon_utils.toy.load import load_toy_backbone, load_toy_clip
    from pigeon_utils.toy.recipe import all_combos, heldout_combos, shuffled

    bb = load_toy_backbone(folder, check_hashes=False)
    clip = load_toy_clip(folder, bb.text_tokenizer)
    eval_ims, eval_f = fresh_images(shuffled(all_combos(), cfg.seed + 4), cfg.n_eval, cfg.seed + 4, cfg.threads)
    fig = {"clip_zero_shot": clip_accuracy(clip, eval_ims, eval_f),
           "round_trip": public(round_trip(bb, clip, eval_ims, eval_f, seed=cfg.seed + 5))}
    fig["caption_to_image"] = public(caption_generation(bb, clip, heldout_combos(cfg), cfg.gen_per_combo,
                                                        seed=cfg.seed + 6))
    prompts, targets = copy_probes(bb.tokenizer, bb.text_tokenizer, bb.layout, heldout_combos(cfg), 4,
                                   cfg.seed + 12)
    fig["in_context_copy"] = {"n_prompts": len(prompts), "n_context": 4,
                              "probability": context_copy(bb.lmm, prompts, targets, bb.layout.pad_id)}
    return fig
