"""Build every toy backbone asset, deterministically from a seed: ``python -m pigeon_utils.toy.build``.

    python -m pigeon_utils.toy.build --out checkpoints/toy --seed 0 --in-context  # the committed build (~28 min)
    python -m pigeon_utils.toy.build --out /tmp/toy --seed 0 --smoke             # seconds; same code path, tiny sizes

Stages (each seeded from ``seed``; images are fresh renders of :mod:`pigeon_utils.toy_data`, plus the toy
datasets' images where ``--data`` has them):

1. visual tokenizer: fit background tiles, colours and per-position shape centroids;
2. text tokenizer: word-level over the toy vocabulary (captions, prompt templates, dataset texts);
3. toy CLIP: contrastive training on images and captions; with ``clip_semantics`` > 0 (``--in-context``) also
   on that fraction of the images again with their semantics texts (the datasets' ``*_semantics`` forms, which
   reference CS compares generated images with);
4. patch autoencoder (the toy "VAE"), then detokenizer + UNet trained together on the diffusion loss;
5. LMM: Llama pre-training on packed caption<->image sequences; with ``lmm_copy_docs`` > 0 (``--in-context``)
   then the *copy phase* (:func:`copy_phase`: uncaptioned same-style documents, after which it copies a style from
   its visual context, as Pigeon needs it to read a history). Optional and off in both recipes: captioned style
   documents mixed into the main phase (``n_lmm_docs``) and a second phase (``lmm_phase2_steps``).
   ``n_heldout_combos`` of the 512 factor combinations never appear in it (they are the generation test);
6. figures (CLIP accuracy, round trip, caption -> image on held-out combinations, in-context copy), recorded in
   ``manifest.json`` with the recipe, the library versions and each file's sha256.

Everything is written to a temporary folder beside ``--out`` and renamed into place at the end, so an interrupted
build never leaves a half-written checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import pigeon_utils  # noqa: F401  (offline defaults, torchvision guard)

# LMM pre-training steps dominate the build; the others are sized to fit the 30-minute budget on 2 CPU cores.


FEATURE_TARGETS = ("image", "image+meaning")  # BuildConfig.detok_feature_target


def check_feature_target(target: str) -> str:
    """`target` if it is one of FEATURE_TARGETS, else a ValueError naming it."""
    if target not in FEATURE_TARGETS:
        raise ValueError(f"detok_feature_target={target!r}: expected one of {FEATURE_TARGETS}")
    return target


@dataclass
class BuildConfig:
    seed: int = 0
    smoke: bool = False  # the tiny configuration of tests (SMOKE)
    threads: int = 2  # torch CPU threads (results are reproducible for a given count; on a machine busy with
    # other work, 1 is much faster than 2 — pass --set threads=1)
    # data
    n_fit: int = 3000  # images the visual tokenizer is fitted on
    n_pool: int = 10000  # fresh renders (all combinations) for CLIP, VAE and decoder, plus the datasets' images
    n_lmm_pool: int = 80000  # fresh renders of the non-held-out combinations for the LMM
    # style documents for the LMM (lmm.document_segments; 0 = none, the committed checkpoint). See IN_CONTEXT.
    n_lmm_docs: int = 0
    lmm_doc_images: tuple = (3, 7)  # images per style document: [low, high)
    lmm_doc_keep: float = 0.8  # probability that an image keeps each of its document's style factors
    lmm_doc_caption: float = 0.5  # probability that a document's context image carries its full caption
    n_heldout_combos: int = 64
    use_dataset_images: bool = True
    # visual tokenizer
    n_shapes: int = 64
    # toy CLIP
    clip_width: int = 16
    clip_steps: int = 350
    clip_batch: int = 128
    clip_lr: float = 2e-3
    clip_semantics: float = 0.0  # fraction of pool images added again with a semantics text (what CS compares with)
    clip_channels_last: bool = False  # channels-last convolutions (faster on CPU; off: the captions-only recipe's)
    # VAE, detokenizer, UNet
    latent_channels: int = 16
    vae_hidden: int = 128
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 3e-3
    detok_dim: int = 32
    unet_channels: tuple = (32, 64)
    dec_steps: int = 1800
    dec_batch: int = 32
    dec_lr: float = 2e-3
    # > 0: the detokenizer's mean output must also reconstruct the toy CLIP's image embedding (what the reference
    # embedding E is built from carries the image's meaning, as LaVIT's does; 0 = diffusion loss only; IN_CONTEXT: 5)
    detok_feature_weight: float = 0.0
    # what that term reconstructs: "image" = the toy CLIP's image embedding; "image+meaning" = that and, beside it,
    # the CLIP text embedding of the image's meaning (its glyph's semantics texts, averaged), each unit-length, which
    # gives the glyph a larger share of the mean output (IN_CONTEXT; see detokenizer_features)
    detok_feature_target: str = "image"
    decode_steps: int = 20
    # LMM
    lmm_hidden: int = 128
    lmm_layers: int = 4
    lmm_heads: int = 4
    lmm_intermediate: int = 384
    lmm_steps: int = 2200
    lmm_batch: int = 32
    lmm_row: int = 128
    lmm_lr: float = 2e-3
    # a second LMM phase (0 steps = none, the committed checkpoint): caption segments plus the first
    # `lmm_phase2_docs` fraction of the style documents, fresh warm-up and cosine decay from `lmm_phase2_lr`
    lmm_phase2_steps: int = 0
    lmm_phase2_lr: float = 1e-3
    lmm_phase2_docs: float = 0.2
    # the copy phase (0 documents = none; IN_CONTEXT: 3,000), after the phases above: `lmm_copy_docs`
    # uncaptioned documents, each delimited by <s> … </s>, whose images share their style exactly, alone until the
    # in-context copy probe (evaluate.context_copy) reaches `lmm_copy_target` (checked every 100 steps, at most
    # `lmm_copy_max_steps`); then `lmm_copy_mix_steps` on them plus the first `lmm_copy_mix_captions` caption
    # segments, which brings caption -> image back. See IN_CONTEXT.
    lmm_copy_docs: int = 0
    lmm_copy_max_steps: int = 1200
    lmm_copy_lr: float = 2e-3
    lmm_copy_target: float = 0.9
    lmm_copy_mix_steps: int = 600
    lmm_copy_mix_lr: float = 1e-3
    lmm_copy_mix_captions: int = 20000
    lmm_copy_row: int = 256  # documents are longer than a caption pair: rows that hold two or three of them
    lmm_copy_batch: int = 16
    lmm_init_from_codes: bool = True  # visual embeddings start from the code table (init_visual_embeddings)
    p_caption_first: float = 0.9
    # figures
    n_eval: int = 512
    gen_per_combo: int = 4
    figures: bool = True

    def __post_init__(self):  # a bad recipe fails when it is made, not 20 minutes into a build
        check_feature_target(self.detok_feature_target)


SMOKE = dict(smoke=True, threads=1, n_fit=96, n_pool=96, n_lmm_pool=96, n_heldout_combos=4, use_dataset_images=False,
             n_shapes=4, clip_width=8, clip_steps=2, clip_batch=8, vae_hidden=16, vae_steps=2, vae_batch=8,
             detok_dim=16, unet_channels=(16, 32), dec_steps=2, dec_batch=8, decode_steps=2, lmm_hidden=32,
             lmm_layers=1, lmm_heads=2, lmm_intermediate=64, lmm_steps=2, lmm_batch=4, lmm_row=64, n_lmm_docs=8,
             lmm_phase2_steps=1, clip_semantics=0.25, detok_feature_weight=0.5, n_eval=16, gen_per_combo=2,
             lmm_copy_docs=8, lmm_copy_max_steps=2, lmm_copy_mix_steps=1, lmm_copy_mix_captions=16, lmm_copy_row=64,
             lmm_copy_batch=4, clip_channels_last=True, detok_feature_target="image+meaning")

# The in-context recipe (README, notebook-06 section; the committed checkpoint's since 2026-11-25): the LMM's main
# phase on caption -> image segments only, then the copy phase (3,000 documents alone until the copy probe reaches
# 0.9, then 250 steps mixed with all caption segments); a toy CLIP also trained on the semantics texts reference CS
# compares with; the detokenizer's feature term at weight 5 on the image embedding *and* the image's meaning (so
# E carries the glyph plainly enough for the toy SFT to take it from the reference), whose decoder needs 1,600
# steps at lr 4e-3 to keep the round-trip and caption -> image bars. With the copy phase, toy SFT takes the style
# from the history. docs/toy-tradeoff-journal.md has the builds that tuned it.
IN_CONTEXT = dict(lmm_copy_docs=3000, p_caption_first=1.0, lmm_steps=2000, lmm_copy_mix_steps=250,
                  lmm_copy_mix_captions=80000, clip_semantics=0.25, clip_steps=550, clip_channels_last=True,
                  detok_feature_weight=5.0, detok_feature_target="image+meaning", dec_steps=1600, dec_lr=4e-3)


def build_command(out: Path, cfg: BuildConfig) -> str:
    """The command line that builds `cfg` (recorded in the manifest): ``--in-context`` / ``--smoke`` when the
    recipe has all of their fields, ``--set`` for every other field that differs from what they give."""
    base, flags = BuildConfig(seed=cfg.seed), []
    if all(getattr(cfg, k) == v for k, v in IN_CONTEXT.items()):
        base, flags = replace(base, **IN_CONTEXT), flags + ["--in-context"]
    if cfg.smoke:
        base, flags = replace(base, **SMOKE), flags + ["--smoke"]
    if not cfg.figures:
        base, flags = replace(base, figures=False), flags + ["--no-figures"]
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (--set parses JSON lists)
    sets = [f"{f.name}={json.dumps(norm(getattr(cfg, f.name)), separators=(',', ':'))}" for f in fields(cfg)
            if norm(getattr(cfg, f.name)) != norm(getattr(base, f.name))]
    return " ".join([f"python -m pigeon_utils.toy.build --out {out} --seed {cfg.seed}", *flags]
                    + (["--set", *sets] if sets else []))


def all_combos() -> list[tuple[str, str, str, str]]:
    from pigeon_utils.toy_data import COLOURS, GLYPHS, PATTERNS, STROKES

    return [(g, c, p, s) for g in GLYPHS for c in COLOURS for p in PATTERNS for s in STROKES]


def heldout_combos(cfg: BuildConfig) -> list[tuple[str, str, str, str]]:
    combos = all_combos()
    idx = np.random.default_rng(cfg.seed + 7).permutation(len(combos))[: cfg.n_heldout_combos]
    return [combos[i] for i in sorted(idx)]


def _shuffled(combos, seed):
    return [combos[i] for i in np.random.default_rng(seed).permutation(len(combos))]


def style_documents(combos, n_docs: int, n_images: tuple[int, int], keep: float, seed: int, workers: int = 1):
    """`n_docs` style documents: each draws a style (colour, pattern, stroke) and ``n_images[0] ≤ k < n_images[1]``
    images; every image keeps each style factor of its document with probability `keep` (else a random value) and
    a random glyph among those whose combination is in `combos` (held-out combinations never appear).
    Returns ``(uint8 images [N, 64, 64, 3], their factors, images per document)``."""
    from pigeon_utils.toy_data import COLOURS, GLYPHS, PATTERNS, STROKES, random_factors, render_many

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
    from pigeon_utils.toy_data import semantics_texts

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(factors), size=int(round(fraction * len(factors))), replace=False))
    texts = []
    for i in idx.tolist():  # one per chosen image
        options = semantics_texts(factors[i]["glyph"])
        texts.append(options[int(rng.integers(len(options)))])
    return idx, texts


def detokenizer_features(clip, images: np.ndarray, factors: list[dict], target: str) -> Tensor:
    """The vectors the detokenizer's feature term reconstructs (``detok_feature_target``), one row per image.

    ``"image"``: the toy CLIP's image embeddings. ``"image+meaning"``: the unit image embedding next to the unit
    mean of the CLIP text embeddings of every semantics text the image's glyph can have (``semantics_texts``) —
    what the image *means*, as LaVIT's decoder conditioning, built for text-to-image, carries meaning. On the
    image embedding alone the mean output separates the glyph only weakly and the toy SFT does not take it from
    E (docs/toy-tradeoff-journal.md, tenth session)."""
    from pigeon_utils.toy_data import GLYPHS, semantics_texts

    check_feature_target(target)
    feats = clip.image_features(images)
    if target == "image":
        return feats
    with torch.no_grad():
        meaning = {g: F.normalize(clip.text_features(semantics_texts(g)), dim=-1).mean(0) for g in GLYPHS}
    rows = F.normalize(torch.stack([meaning[f["glyph"]] for f in factors]), dim=-1)
    return torch.cat([F.normalize(feats, dim=-1), rows], dim=1)


def _dataset_images(data_dir: Path | None):
    """The toy datasets' images and factors (empty when `data_dir` lacks them)."""
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


def _log(msg: str) -> None:
    print(f"[toy build] {msg}", flush=True)


def build(out: Path, cfg: BuildConfig, data_dir: Path | None = Path("dataset"), progress: bool = True) -> dict:
    """Build all toy assets into `out` (replaced atomically). Returns the manifest."""
    t_start = time.monotonic()
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _build(out, cfg, data_dir, progress, t_start)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _build(out: Path, cfg: BuildConfig, data_dir: Path | None, progress: bool, t_start: float) -> dict:
    from transformers import __version__ as tf_version

    from pigeon_utils.backbone import pad_codes
    from pigeon_utils.toy import clip as toy_clip
    from pigeon_utils.toy.decoder import (PatchAutoencoder, PatchAutoencoderConfig, ToyPixelDecoder, make_scheduler,
                                          make_unet, train_autoencoder, train_pixel_decoder)
    from pigeon_utils.toy.detokenizer import ToyDetokenizer, ToyDetokenizerConfig
    from pigeon_utils.toy.evaluate import fresh_images
    from pigeon_utils.toy.io import sha256, write_json
    from pigeon_utils.toy.lmm import init_visual_embeddings, make_llama, pretraining_segments, train_lmm
    from pigeon_utils.toy.text import build_text_tokenizer, layout_for, toy_text_corpus
    from pigeon_utils.toy.tokenizer import ToyTokenizerConfig, ToyVisualTokenizer
    from pigeon_utils.toy_data import ToyFactors

    out = Path(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    seconds: dict[str, float] = {}

    def stage(name: str, t0: float) -> float:
        seconds[name] = round(time.monotonic() - t0, 1)
        _log(f"{name}: {seconds[name]:.1f} s")
        return time.monotonic()

    def gen(k: int) -> torch.Generator:
        torch.manual_seed(cfg.seed * 1000 + k)
        return torch.Generator().manual_seed(cfg.seed * 1000 + k)

    # ---- data
    t = time.monotonic()
    combos, held = all_combos(), heldout_combos(cfg)
    train_combos = [c for c in combos if c not in set(held)]
    fit_ims, _ = fresh_images(_shuffled(combos, cfg.seed + 1), cfg.n_fit, cfg.seed + 1, cfg.threads)
    pool_ims, pool_f = fresh_images(_shuffled(combos, cfg.seed + 2), cfg.n_pool, cfg.seed + 2, cfg.threads)
    if cfg.use_dataset_images:
        ims, fs = _dataset_images(data_dir)
        if ims:
            pool_ims, pool_f = np.concatenate([pool_ims, np.stack(ims)]), pool_f + fs
    lmm_ims, lmm_f = fresh_images(_shuffled(train_combos, cfg.seed + 3), cfg.n_lmm_pool, cfg.seed + 3, cfg.threads)
    doc_ims, doc_f, doc_sizes = style_documents(train_combos, cfg.n_lmm_docs, tuple(cfg.lmm_doc_images),
                                                cfg.lmm_doc_keep, cfg.seed + 8, cfg.threads)
    copy_ims, copy_f, copy_sizes = style_documents(train_combos, cfg.lmm_copy_docs, tuple(cfg.lmm_doc_images), 1.0,
                                                   cfg.seed + 10, cfg.threads)
    t = stage("render", t)

    # ---- 1. visual tokenizer
    tokenizer = ToyVisualTokenizer.fit(fit_ims, ToyTokenizerConfig(n_shapes=cfg.n_shapes), seed=cfg.seed)
    tokenizer.save_pretrained(tmp / "visual_tokenizer")
    t = stage("visual tokenizer", t)

    # ---- 2. text tokenizer
    text_tok = build_text_tokenizer(toy_text_corpus(data_dir))
    text_tok.save_pretrained(tmp / "text_tokenizer")
    layout = layout_for(text_tok, tokenizer.codebook_size)
    t = stage("text tokenizer", t)

    # ---- 3. toy CLIP
    g = gen(3)
    clip_cfg = toy_clip.clip_model_cfg(len(text_tok), width=cfg.clip_width)
    toy_clip.write_clip_config(tmp / "clip", clip_cfg)
    clip = toy_clip.ToyClip(toy_clip.create_clip(tmp / "clip"), text_tok)
    pool_caps = [ToyFactors(**f).caption() for f in pool_f]
    sem_idx, sem_texts = semantics_pairs(pool_f, cfg.clip_semantics, cfg.seed + 9)
    clip_loss = toy_clip.train_clip(clip, torch.from_numpy(np.concatenate([pool_ims, pool_ims[sem_idx]])),
                                    pool_caps + sem_texts, cfg.clip_steps, cfg.clip_batch, cfg.clip_lr, g, progress,
                                    channels_last=cfg.clip_channels_last)
    clip.save_pretrained(tmp / "clip", clip_cfg)
    t = stage("toy CLIP", t)

    # ---- 4. VAE, detokenizer + UNet
    g = gen(4)
    pool_x = torch.from_numpy(pool_ims).permute(0, 3, 1, 2).float() / 255
    vae = PatchAutoencoder(PatchAutoencoderConfig(latent_channels=cfg.latent_channels, hidden=cfg.vae_hidden))
    vae_mse = train_autoencoder(vae, pool_x, cfg.vae_steps, cfg.vae_batch, cfg.vae_lr, g, progress=progress)
    t = stage("VAE", t)
    g = gen(5)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pool_x[i:i + 1024]) for i in range(0, len(pool_x), 1024)])
    codes, mask = pad_codes(tokenizer.tokenize(pool_ims).codes)
    detok = ToyDetokenizer(ToyDetokenizerConfig(codebook_size=tokenizer.codebook_size, dim=cfg.detok_dim,
                                                pooled_dim=cfg.detok_dim,
                                                patch_pixels=tokenizer.config.patch_size**2,
                                                n_patches=tokenizer.config.n_patches))
    detok.set_code_table(tokenizer.code_table())
    unet = make_unet(cfg.latent_channels, cfg.detok_dim, cfg.detok_dim, grid=tokenizer.config.grid,
                     channels=cfg.unet_channels)
    decoder = ToyPixelDecoder(unet, make_scheduler(), vae, num_inference_steps=cfg.decode_steps)
    feats = (detokenizer_features(clip, pool_ims, pool_f, cfg.detok_feature_target)
             if cfg.detok_feature_weight > 0 else None)
    dec_loss = train_pixel_decoder(detok, decoder, codes, mask, latents, cfg.dec_steps, cfg.dec_batch, cfg.dec_lr,
                                   g, progress=progress, features=feats, feature_weight=cfg.detok_feature_weight)
    detok.save_pretrained(tmp / "detokenizer")
    decoder.save_pretrained(tmp / "pixel_decoder")
    t = stage("detokenizer + UNet", t)

    # ---- 5. LMM
    g = gen(6)
    lmm_codes = tokenizer.tokenize(lmm_ims).codes
    cap_ids = text_tok([ToyFactors(**f).caption() for f in lmm_f], add_special_tokens=False)["input_ids"]
    segments = pretraining_segments(lmm_codes, cap_ids, layout, text_tok.eos_token_id, cfg.p_caption_first, g)
    doc_segments = document_ids(tokenizer, text_tok, layout, doc_ims, doc_f, doc_sizes, cfg.lmm_doc_caption, g)
    lmm = make_llama(layout.vocab_size, layout, cfg.lmm_hidden, cfg.lmm_layers, cfg.lmm_heads, cfg.lmm_intermediate)
    if cfg.lmm_init_from_codes:
        init_visual_embeddings(lmm, layout, tokenizer.code_table(), g)
    lmm_stats = train_lmm(lmm, segments + doc_segments, cfg.lmm_steps, cfg.lmm_batch, cfg.lmm_row, cfg.lmm_lr, g,
                          progress)
    if cfg.lmm_phase2_steps:
        n_docs = int(round(cfg.lmm_phase2_docs * len(doc_segments)))
        lmm_stats["phase2"] = train_lmm(lmm, segments + doc_segments[:n_docs], cfg.lmm_phase2_steps, cfg.lmm_batch,
                                        cfg.lmm_row, cfg.lmm_phase2_lr, g, progress)
    if cfg.lmm_copy_docs:
        lmm_stats["copy"] = copy_phase(lmm, cfg, tokenizer, text_tok, layout, segments, copy_ims, copy_f,
                                       copy_sizes, train_combos, g, progress)
    lmm.generation_config.pad_token_id = layout.pad_id
    lmm.save_pretrained(tmp / "language_model", safe_serialization=True)
    t = stage("LMM", t)

    # ---- manifest (hashes), then figures from the files just written
    manifest = {
        "seed": cfg.seed, "recipe": asdict(cfg), "command": build_command(out, cfg),
        "versions": {"torch": torch.__version__, "transformers": tf_version, "diffusers": _version("diffusers"),
                     "open_clip": _version("open_clip_torch"), "tokenizers": _version("tokenizers")},
        "layout": asdict(layout), "heldout_combos": [list(c) for c in held],
        "train_stats": {"clip_loss": clip_loss, "vae_mse": vae_mse, "decoder_loss": dec_loss, "lmm": lmm_stats,
                        "n_pool_images": len(pool_ims), "n_lmm_images": len(lmm_ims),
                        "n_lmm_documents": len(doc_sizes), "n_document_images": len(doc_ims),
                        "n_copy_documents": len(copy_sizes), "n_copy_document_images": len(copy_ims),
                        "n_clip_semantics_pairs": len(sem_idx)},
        "params": {"clip": _n_params(clip.model), "vae": _n_params(vae), "detokenizer": _n_params(detok),
                   "unet": _n_params(unet), "lmm": _n_params(lmm)},
    }
    manifest["files"] = {p.relative_to(tmp).as_posix(): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json(manifest, tmp / "manifest.json")
    if cfg.figures:
        manifest["figures"] = compute_figures(tmp, cfg)
        t = stage("figures", t)
    manifest["build_seconds"] = round(time.monotonic() - t_start, 1)
    manifest["stage_seconds"] = seconds
    write_json(manifest, tmp / "manifest.json")

    # ---- swap into place
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    if old.exists():
        shutil.rmtree(old)
    _log(f"wrote {out} in {manifest['build_seconds']:.0f} s")
    return manifest


def copy_phase(lmm, cfg: BuildConfig, tokenizer, text_tok, layout, caption_segments, ims, factors, sizes,
               train_combos, g: torch.Generator, progress: bool) -> dict:
    """The LMM's copy phase (see BuildConfig): documents alone until the in-context copy probe reaches its
    target, then documents and captions. An LMM trained on captions and captioned documents copies a context
    image's style from its caption but not from its visual tokens; with uncaptioned documents mixed into
    caption training, copying visual tokens had not emerged after 1,200 steps; with documents alone it emerges
    within a few hundred (docs/toy-tradeoff-journal.md)."""
    from pigeon_utils.toy.evaluate import context_copy, copy_probes
    from pigeon_utils.toy.lmm import train_lmm

    docs = document_ids(tokenizer, text_tok, layout, ims, factors, sizes, 0.0, g, delimit=True)
    rng = np.random.default_rng(cfg.seed + 11)
    probe_combos = [train_combos[i] for i in rng.choice(len(train_combos), min(128, len(train_combos)),
                                                        replace=False)]
    prompts, targets = copy_probes(tokenizer, text_tok, layout, probe_combos, 4, cfg.seed + 11)
    check = lambda: context_copy(lmm, prompts, targets, layout.pad_id)  # noqa: E731
    alone = train_lmm(lmm, docs, cfg.lmm_copy_max_steps, cfg.lmm_copy_batch, cfg.lmm_copy_row, cfg.lmm_copy_lr, g,
                      progress, check=check, check_every=min(100, cfg.lmm_copy_max_steps),
                      stop_at=cfg.lmm_copy_target)
    mixed = train_lmm(lmm, docs + list(caption_segments[: cfg.lmm_copy_mix_captions]), cfg.lmm_copy_mix_steps,
                      cfg.lmm_copy_batch, cfg.lmm_copy_row, cfg.lmm_copy_mix_lr, g, progress)
    mixed["copy_probability"] = round(check(), 4)
    return {"alone": alone, "mixed": mixed}


def compute_figures(folder: Path, cfg: BuildConfig) -> dict:
    """The "Must show" figures of a checkpoint folder (see :mod:`pigeon_utils.toy.evaluate`)."""
    from pigeon_utils.toy.evaluate import (caption_generation, clip_accuracy, context_copy, copy_probes, fresh_images,
                                           public, round_trip)
    from pigeon_utils.toy.load import load_toy_backbone, load_toy_clip

    bb = load_toy_backbone(folder, check_hashes=False)
    clip = load_toy_clip(folder, bb.text_tokenizer)
    eval_ims, eval_f = fresh_images(_shuffled(all_combos(), cfg.seed + 4), cfg.n_eval, cfg.seed + 4, cfg.threads)
    fig = {"clip_zero_shot": clip_accuracy(clip, eval_ims, eval_f),
           "round_trip": public(round_trip(bb, clip, eval_ims, eval_f, seed=cfg.seed + 5))}
    fig["caption_to_image"] = public(caption_generation(bb, clip, heldout_combos(cfg), cfg.gen_per_combo,
                                                        seed=cfg.seed + 6))
    prompts, targets = copy_probes(bb.tokenizer, bb.text_tokenizer, bb.layout, heldout_combos(cfg), 4,
                                   cfg.seed + 12)
    fig["in_context_copy"] = {"n_prompts": len(prompts), "n_context": 4,
                              "probability": context_copy(bb.lmm, prompts, targets, bb.layout.pad_id)}
    return fig


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the toy backbone (tokenizers, LMM, detokenizer, pixel decoder, "
                                             "toy CLIP) into a checkpoint folder.")
    ap.add_argument("--out", type=Path, default=Path("checkpoints/toy"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=Path, default=Path("dataset"), help="folder holding toy-sticker / toy-poster")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and step counts (seconds), same code path")
    ap.add_argument("--no-figures", action="store_true", help="skip the evaluation figures")
    ap.add_argument("--in-context", action="store_true",
                    help="the in-context recipe (IN_CONTEXT: the LMM's copy phase, semantics texts for the CLIP, "
                         "the detokenizer's feature term)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override BuildConfig fields")
    a = ap.parse_args(argv)
    cfg = BuildConfig(seed=a.seed)
    if a.in_context:
        cfg = replace(cfg, **IN_CONTEXT)
    if a.smoke:
        cfg = replace(cfg, **SMOKE)
    types = {f.name: f.type for f in fields(BuildConfig)}
    for kv in a.set:
        k, v = kv.split("=", 1)
        if k not in types:
            raise SystemExit(f"--set {kv}: unknown field {k!r}; fields: {sorted(types)}")
        # JSON values (numbers, lists, quoted strings); a text field also takes its value bare (target=image+meaning)
        cfg = replace(cfg, **{k: v if types[k] in ("str", str) and not v.startswith('"') else json.loads(v)})
    if a.no_figures:
        cfg = replace(cfg, figures=False)
    m = build(a.out, cfg, a.data)
    print(json.dumps(m.get("figures", {}), indent=1))


if __name__ == "__main__":
    main()
