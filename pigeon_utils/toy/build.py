"""Build every toy backbone asset, deterministically from a seed: ``python -m pigeon_utils.toy.build``.

    python -m pigeon_utils.toy.build --out checkpoints/toy --seed 0            # the committed build (~29 min, 2 CPUs)
    python -m pigeon_utils.toy.build --out /tmp/toy --seed 0 --smoke          # seconds; same code path, tiny sizes

Stages (each seeded from ``seed``; images are fresh renders of :mod:`pigeon_utils.toy_data`, plus the toy
datasets' images where ``--data`` has them):

1. visual tokenizer: fit background tiles, colours and per-position shape centroids;
2. text tokenizer: word-level over the toy vocabulary (captions, prompt templates, dataset texts);
3. toy CLIP: contrastive training on images and captions;
4. patch autoencoder (the toy "VAE"), then detokenizer + UNet trained together on the diffusion loss;
5. LMM: Llama pre-training on packed caption<->image sequences; ``n_heldout_combos`` of the 512 factor
   combinations never appear in it (they are the generation test);
6. figures (CLIP accuracy, round trip, caption -> image on held-out combinations), recorded in ``manifest.json``
   with the recipe, the library versions and each file's sha256.

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

import pigeon_utils  # noqa: F401  (offline defaults, torchvision guard)

# LMM pre-training steps dominate the build; the others are sized to fit the 30-minute budget on 2 CPU cores.


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
    n_heldout_combos: int = 64
    use_dataset_images: bool = True
    # visual tokenizer
    n_shapes: int = 64
    # toy CLIP
    clip_width: int = 16
    clip_steps: int = 350
    clip_batch: int = 128
    clip_lr: float = 2e-3
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
    lmm_init_from_codes: bool = True  # visual embeddings start from the code table (init_visual_embeddings)
    p_caption_first: float = 0.9
    # figures
    n_eval: int = 512
    gen_per_combo: int = 4
    figures: bool = True


SMOKE = dict(smoke=True, threads=1, n_fit=96, n_pool=96, n_lmm_pool=96, n_heldout_combos=4, use_dataset_images=False,
             n_shapes=4, clip_width=8, clip_steps=2, clip_batch=8, vae_hidden=16, vae_steps=2, vae_batch=8,
             detok_dim=16, unet_channels=(16, 32), dec_steps=2, dec_batch=8, decode_steps=2, lmm_hidden=32,
             lmm_layers=1, lmm_heads=2, lmm_intermediate=64, lmm_steps=2, lmm_batch=4, lmm_row=64, n_eval=16,
             gen_per_combo=2)


def all_combos() -> list[tuple[str, str, str, str]]:
    from pigeon_utils.toy_data import COLOURS, GLYPHS, PATTERNS, STROKES

    return [(g, c, p, s) for g in GLYPHS for c in COLOURS for p in PATTERNS for s in STROKES]


def heldout_combos(cfg: BuildConfig) -> list[tuple[str, str, str, str]]:
    combos = all_combos()
    idx = np.random.default_rng(cfg.seed + 7).permutation(len(combos))[: cfg.n_heldout_combos]
    return [combos[i] for i in sorted(idx)]


def _shuffled(combos, seed):
    return [combos[i] for i in np.random.default_rng(seed).permutation(len(combos))]


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
    fit_ims, _ = fresh_images(_shuffled(combos, cfg.seed + 1), cfg.n_fit, cfg.seed + 1)
    pool_ims, pool_f = fresh_images(_shuffled(combos, cfg.seed + 2), cfg.n_pool, cfg.seed + 2)
    if cfg.use_dataset_images:
        ims, fs = _dataset_images(data_dir)
        if ims:
            pool_ims, pool_f = np.concatenate([pool_ims, np.stack(ims)]), pool_f + fs
    lmm_ims, lmm_f = fresh_images(_shuffled(train_combos, cfg.seed + 3), cfg.n_lmm_pool, cfg.seed + 3)
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
    clip_loss = toy_clip.train_clip(clip, torch.from_numpy(pool_ims), pool_caps, cfg.clip_steps, cfg.clip_batch,
                                    cfg.clip_lr, g, progress)
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
    dec_loss = train_pixel_decoder(detok, decoder, codes, mask, latents, cfg.dec_steps, cfg.dec_batch, cfg.dec_lr,
                                   g, progress=progress)
    detok.save_pretrained(tmp / "detokenizer")
    decoder.save_pretrained(tmp / "pixel_decoder")
    t = stage("detokenizer + UNet", t)

    # ---- 5. LMM
    g = gen(6)
    lmm_codes = tokenizer.tokenize(lmm_ims).codes
    cap_ids = text_tok([ToyFactors(**f).caption() for f in lmm_f], add_special_tokens=False)["input_ids"]
    segments = pretraining_segments(lmm_codes, cap_ids, layout, text_tok.eos_token_id, cfg.p_caption_first, g)
    lmm = make_llama(layout.vocab_size, layout, cfg.lmm_hidden, cfg.lmm_layers, cfg.lmm_heads, cfg.lmm_intermediate)
    if cfg.lmm_init_from_codes:
        init_visual_embeddings(lmm, layout, tokenizer.code_table(), g)
    lmm_stats = train_lmm(lmm, segments, cfg.lmm_steps, cfg.lmm_batch, cfg.lmm_row, cfg.lmm_lr, g, progress)
    lmm.generation_config.pad_token_id = layout.pad_id
    lmm.save_pretrained(tmp / "language_model", safe_serialization=True)
    t = stage("LMM", t)

    # ---- manifest (hashes), then figures from the files just written
    manifest = {
        "seed": cfg.seed, "recipe": asdict(cfg), "command": f"python -m pigeon_utils.toy.build --out {out} "
        f"--seed {cfg.seed}" + (" --smoke" if cfg.smoke else ""),
        "versions": {"torch": torch.__version__, "transformers": tf_version, "diffusers": _version("diffusers"),
                     "open_clip": _version("open_clip_torch"), "tokenizers": _version("tokenizers")},
        "layout": asdict(layout), "heldout_combos": [list(c) for c in held],
        "train_stats": {"clip_loss": clip_loss, "vae_mse": vae_mse, "decoder_loss": dec_loss, "lmm": lmm_stats,
                        "n_pool_images": len(pool_ims), "n_lmm_images": len(lmm_ims)},
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


def compute_figures(folder: Path, cfg: BuildConfig) -> dict:
    """The "Must show" figures of a checkpoint folder (see :mod:`pigeon_utils.toy.evaluate`)."""
    from pigeon_utils.toy.evaluate import caption_generation, clip_accuracy, fresh_images, public, round_trip
    from pigeon_utils.toy.load import load_toy_backbone, load_toy_clip

    bb = load_toy_backbone(folder, check_hashes=False)
    clip = load_toy_clip(folder, bb.text_tokenizer)
    eval_ims, eval_f = fresh_images(_shuffled(all_combos(), cfg.seed + 4), cfg.n_eval, cfg.seed + 4)
    fig = {"clip_zero_shot": clip_accuracy(clip, eval_ims, eval_f),
           "round_trip": public(round_trip(bb, clip, eval_ims, eval_f, seed=cfg.seed + 5))}
    fig["caption_to_image"] = public(caption_generation(bb, clip, heldout_combos(cfg), cfg.gen_per_combo,
                                                        seed=cfg.seed + 6))
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
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override BuildConfig fields")
    a = ap.parse_args(argv)
    cfg = BuildConfig(seed=a.seed)
    if a.smoke:
        cfg = replace(cfg, **SMOKE)
    types = {f.name: f.type for f in fields(BuildConfig)}
    for kv in a.set:
        k, v = kv.split("=", 1)
        if k not in types:
            raise SystemExit(f"--set {kv}: unknown field {k!r}; fields: {sorted(types)}")
        cfg = replace(cfg, **{k: json.loads(v)})
    if a.no_figures:
        cfg = replace(cfg, figures=False)
    m = build(a.out, cfg, a.data)
    print(json.dumps(m.get("figures", {}), indent=1))


if __name__ == "__main__":
    main()
