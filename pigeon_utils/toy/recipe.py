"""The toy build's recipe: :class:`BuildConfig` (whose defaults are the committed ``checkpoints/toy``), the
:data:`SMOKE` sizes of the tests, the command line that builds a recipe, and the factor combinations the build
holds out.

The recipe and why each of its parts is there are described in docs/toy-world.md.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

COMMAND = "python -m pigeon_utils.toy.build"


@dataclass
class BuildConfig:
    """Everything a toy build depends on besides the code; the defaults build the committed checkpoint.

    LMM: pre-training on caption -> image segments (``p_caption_first`` of them caption first, the rest image ->
    caption), then the *copy phase*: ``lmm_copy_docs`` uncaptioned style documents (each between ``<s>`` and
    ``</s>``, its images sharing one style), alone until the in-context copy probe reaches ``lmm_copy_target``
    (checked every 100 steps, at most ``lmm_copy_max_steps``), then ``lmm_copy_mix_steps`` on them plus the first
    ``lmm_copy_mix_captions`` caption segments. Toy CLIP: also trained on a ``clip_semantics`` fraction of the images
    again with their semantics texts (what reference CS compares generated images with). Detokenizer: the diffusion
    loss plus, at ``detok_feature_weight``, a term that makes its mean output reconstruct the image's meaning
    (:func:`pigeon_utils.toy.training_data.detokenizer_features`).
    """

    seed: int = 0
    smoke: bool = False  # the tiny sizes of the tests (SMOKE)
    threads: int = 2  # torch CPU threads (results are reproducible for a given count)
    # data
    n_fit: int = 3000  # images the visual tokenizer is fitted on
    n_pool: int = 10000  # fresh renders (all combinations) for CLIP, VAE and decoder, plus the datasets' images
    n_lmm_pool: int = 80000  # fresh renders of the non-held-out combinations for the LMM
    n_heldout_combos: int = 64  # factor combinations the LMM never sees (the caption -> image test)
    use_dataset_images: bool = True
    # visual tokenizer
    n_shapes: int = 64
    # toy CLIP
    clip_width: int = 16
    clip_steps: int = 550
    clip_batch: int = 128
    clip_lr: float = 2e-3
    clip_semantics: float = 0.25  # fraction of pool images added again with a semantics text
    # VAE, detokenizer, UNet
    latent_channels: int = 16
    vae_hidden: int = 128
    vae_steps: int = 1500
    vae_batch: int = 32
    vae_lr: float = 3e-3
    detok_dim: int = 64  # width of its output rows, and so of the mean Pigeon's adapter reads (docs/toy-world.md)
    unet_channels: tuple = (32, 64)
    dec_steps: int = 1600
    dec_batch: int = 32
    dec_lr: float = 4e-3
    detok_feature_weight: float = 5.0  # the meaning term (0 = diffusion loss only)
    decode_steps: int = 20
    # LMM pre-training
    lmm_hidden: int = 128
    lmm_layers: int = 4
    lmm_heads: int = 4
    lmm_intermediate: int = 384
    lmm_steps: int = 2000
    lmm_batch: int = 32
    lmm_row: int = 128
    lmm_lr: float = 2e-3
    p_caption_first: float = 1.0
    # LMM copy phase
    lmm_copy_docs: int = 3000
    lmm_doc_images: tuple = (3, 7)  # images per style document: [low, high)
    lmm_copy_max_steps: int = 1200
    lmm_copy_lr: float = 2e-3
    lmm_copy_target: float = 0.9
    lmm_copy_mix_steps: int = 250
    lmm_copy_mix_lr: float = 1e-3
    lmm_copy_mix_captions: int = 80000
    lmm_copy_row: int = 256  # documents are longer than a caption pair: rows that hold two or three of them
    lmm_copy_batch: int = 16
    # figures
    n_eval: int = 512
    gen_per_combo: int = 4
    figures: bool = True


# The tests' build (``--smoke``): the default recipe's code path at tiny sizes and step counts (seconds).
SMOKE = dict(smoke=True, threads=1, n_fit=96, n_pool=96, n_lmm_pool=96, n_heldout_combos=4, use_dataset_images=False,
             n_shapes=4, clip_width=8, clip_steps=2, clip_batch=8, vae_hidden=16, vae_steps=2, vae_batch=8,
             detok_dim=16, unet_channels=(16, 32), dec_steps=2, dec_batch=8, decode_steps=2, lmm_hidden=32,
             lmm_layers=1, lmm_heads=2, lmm_intermediate=64, lmm_steps=2, lmm_batch=4, lmm_row=64, n_eval=16,
             gen_per_combo=2, lmm_copy_docs=8, lmm_copy_max_steps=2, lmm_copy_mix_steps=1, lmm_copy_mix_captions=16,
             lmm_copy_row=64, lmm_copy_batch=4)

# Fields that recipes recorded in older manifests (``checkpoints/toy/manifest.json`` among them) and that are no
# longer options, with the value the build now always uses (None: the field only tuned a part that no recipe has
# any more, so any value reads the same). :func:`config_from_recipe` accepts them at these values.
RETIRED = {
    "n_lmm_docs": 0,  # captioned style documents in the main LMM phase
    "lmm_doc_keep": None,
    "lmm_doc_caption": None,
    "lmm_phase2_steps": 0,  # a second LMM phase
    "lmm_phase2_lr": None,
    "lmm_phase2_docs": None,
    "clip_channels_last": True,  # the toy CLIP always trains with channels-last convolutions
    "detok_feature_target": "image+meaning",  # what the detokenizer's feature term reconstructs
    "lmm_init_from_codes": True,  # visual embeddings start from the code table
}


def config_from_recipe(recipe: dict) -> BuildConfig:
    """The :class:`BuildConfig` of a manifest's ``recipe``: lists back to tuples, :data:`RETIRED` fields dropped
    when they hold the value the build now always uses; a ValueError when they do not (this code cannot rebuild
    that recipe) or when a field is unknown."""
    kinds = {f.name: f.type for f in fields(BuildConfig)}
    kept = {}
    for k, v in recipe.items():
        if k in RETIRED:
            if RETIRED[k] is not None and v != RETIRED[k]:
                raise ValueError(f"recipe field {k}={v!r}: no longer an option (the build always uses "
                                 f"{RETIRED[k]!r}), so this code cannot rebuild that recipe")
        elif k not in kinds:
            raise ValueError(f"recipe field {k!r} is not a BuildConfig field; fields: {sorted(kinds)}")
        else:
            kept[k] = tuple(v) if kinds[k] in ("tuple", tuple) and isinstance(v, list) else v
    return BuildConfig(**kept)


def parse_setting(cfg: BuildConfig, setting: str) -> BuildConfig:
    """`cfg` with one ``KEY=VALUE`` (``--set``) applied; the value is JSON (numbers, booleans, lists)."""
    kinds = {f.name: f.type for f in fields(BuildConfig)}
    if "=" not in setting:
        raise ValueError(f"--set {setting}: expected KEY=VALUE")
    k, v = setting.split("=", 1)
    if k not in kinds:
        raise ValueError(f"--set {setting}: unknown field {k!r}; fields: {sorted(kinds)}")
    value = json.loads(v)
    if kinds[k] in ("tuple", tuple) and isinstance(value, list):
        value = tuple(value)
    return replace(cfg, **{k: value})


def build_command(out: Path | str, cfg: BuildConfig) -> str:
    """The command line that builds `cfg` (recorded in the manifest): ``--smoke`` / ``--no-figures`` when `cfg` has
    their settings, ``--set`` for every other field that differs from what they give."""
    base, flags = BuildConfig(seed=cfg.seed), []
    if cfg.smoke:
        base, flags = replace(base, **SMOKE), flags + ["--smoke"]
    if not cfg.figures:
        base, flags = replace(base, figures=False), flags + ["--no-figures"]
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (--set parses JSON lists)
    sets = [f"{f.name}={json.dumps(norm(getattr(cfg, f.name)), separators=(',', ':'))}" for f in fields(cfg)
            if norm(getattr(cfg, f.name)) != norm(getattr(base, f.name))]
    return " ".join([f"{COMMAND} --out {out} --seed {cfg.seed}", *flags] + (["--set", *sets] if sets else []))


def all_combos() -> list[tuple[str, str, str, str]]:
    """Every (glyph, colour, pattern, stroke) combination, in a fixed order."""
    from pigeon_utils.toy.data import COLOURS, GLYPHS, PATTERNS, STROKES

    return [(g, c, p, s) for g in GLYPHS for c in COLOURS for p in PATTERNS for s in STROKES]


def heldout_combos(cfg: BuildConfig) -> list[tuple[str, str, str, str]]:
    """The ``n_heldout_combos`` combinations kept out of the LMM's training (drawn from ``seed``)."""
    combos = all_combos()
    idx = np.random.default_rng(cfg.seed + 7).permutation(len(combos))[: cfg.n_heldout_combos]
    return [combos[i] for i in sorted(idx)]


def shuffled(combos: list, seed: int) -> list:
    """`combos` in a random order drawn from `seed`."""
    return [combos[i] for i in np.random.default_rng(seed).permutation(len(combos))]
