"""Build every toy backbone asset, deterministically from a seed: ``python -m pigeon_utils.toy.build``.

    python -m pigeon_utils.toy.build --out checkpoints/toy --seed 0     # the committed checkpoint
    python -m pigeon_utils.toy.build --out /tmp/toy --seed 0 --smoke   # seconds; same code path, tiny sizes

The recipe is :class:`~pigeon_utils.toy.recipe.BuildConfig` (its defaults are the committed checkpoint's; ``--set
KEY=VALUE`` changes one field). Stages, each seeded from ``seed`` (images are fresh renders of
:mod:`pigeon_utils.toy.data`, plus the toy datasets' images where ``--data`` has them; the other training inputs
come from :mod:`pigeon_utils.toy.training_data`):

1. visual tokenizer: fit background tiles, colours and per-position shape centroids;
2. text tokenizer: word-level over the toy vocabulary (captions, prompt templates, dataset texts);
3. toy CLIP: contrastive training on images and captions, and on a fraction of the images again with their
   semantics texts (the datasets' ``*_semantics`` forms, which reference CS compares generated images with);
4. patch autoencoder (the toy "VAE"), then detokenizer + UNet trained together on the diffusion loss plus a term
   that makes the detokenizer's mean output carry the image's meaning;
5. LMM: Llama pre-training on caption -> image segments, then the *copy phase* (:func:`copy_phase`: uncaptioned
   same-style documents, after which it copies a style from its visual context, as Pigeon needs it to read a
   history). ``n_heldout_combos`` of the 512 factor combinations never appear in it (they are the generation test);
6. figures (:func:`pigeon_utils.toy.evaluate.compute_figures`: CLIP accuracy, round trip, caption -> image on
   held-out combinations, in-context copy), recorded in ``manifest.json`` with the recipe, the command, the library
   versions and each file's sha256.

Everything is written to a temporary folder beside ``--out`` and swapped into place at the end
(:func:`pigeon_utils.atomic.atomic_dir`), so an interrupted build never leaves a half-written checkpoint. Why the
recipe is what it is: docs/toy-world.md.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import pigeon_utils  # noqa: F401  (offline defaults, torchvision guard)
from pigeon_utils.atomic import atomic_dir
from pigeon_utils.toy.recipe import (SMOKE, BuildConfig, all_combos, build_command, heldout_combos, parse_setting,
                                     shuffled)
from pigeon_utils.toy.training_data import dataset_images, detokenizer_features, document_ids, semantics_pairs, \
    style_documents


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
    out, manifest = Path(out), {}
    try:
        atomic_dir(out, lambda tmp: manifest.update(_build_into(tmp, out, cfg, data_dir, progress, t_start)))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    _log(f"wrote {out} in {manifest['build_seconds']:.0f} s")
    return manifest


def _build_into(tmp: Path, out: Path, cfg: BuildConfig, data_dir: Path | None, progress: bool,
                t_start: float) -> dict:
    """Write every asset of `cfg` into the empty folder `tmp` (which becomes `out`); return the manifest."""
    from transformers import __version__ as tf_version

    from pigeon_utils.backbone import pad_codes
    from pigeon_utils.toy import clip as toy_clip
    from pigeon_utils.toy.data import ToyFactors
    from pigeon_utils.toy.decoder import (PatchAutoencoder, PatchAutoencoderConfig, ToyPixelDecoder, make_scheduler,
                                          make_unet, train_autoencoder, train_pixel_decoder)
    from pigeon_utils.toy.detokenizer import ToyDetokenizer, ToyDetokenizerConfig
    from pigeon_utils.toy.evaluate import compute_figures, fresh_images
    from pigeon_utils.toy.io import sha256, write_json
    from pigeon_utils.toy.lmm import init_visual_embeddings, make_llama, pretraining_segments, train_lmm
    from pigeon_utils.toy.text import build_text_tokenizer, layout_for, toy_text_corpus
    from pigeon_utils.toy.tokenizer import ToyTokenizerConfig, ToyVisualTokenizer

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
    fit_ims, _ = fresh_images(shuffled(combos, cfg.seed + 1), cfg.n_fit, cfg.seed + 1, cfg.threads)
    pool_ims, pool_f = fresh_images(shuffled(combos, cfg.seed + 2), cfg.n_pool, cfg.seed + 2, cfg.threads)
    if cfg.use_dataset_images:
        ims, fs = dataset_images(data_dir)
        if ims:
            pool_ims, pool_f = np.concatenate([pool_ims, np.stack(ims)]), pool_f + fs
    lmm_ims, lmm_f = fresh_images(shuffled(train_combos, cfg.seed + 3), cfg.n_lmm_pool, cfg.seed + 3, cfg.threads)
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
                                    channels_last=True)
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
    feats = detokenizer_features(clip, pool_ims, pool_f) if cfg.detok_feature_weight > 0 else None
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
    lmm = make_llama(layout.vocab_size, layout, cfg.lmm_hidden, cfg.lmm_layers, cfg.lmm_heads, cfg.lmm_intermediate)
    init_visual_embeddings(lmm, layout, tokenizer.code_table(), g)
    lmm_stats = train_lmm(lmm, segments, cfg.lmm_steps, cfg.lmm_batch, cfg.lmm_row, cfg.lmm_lr, g, progress)
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
    return manifest


def copy_phase(lmm, cfg: BuildConfig, tokenizer, text_tok, layout, caption_segments, ims, factors, sizes,
               train_combos, g: torch.Generator, progress: bool) -> dict:
    """The LMM's copy phase (see :class:`~pigeon_utils.toy.recipe.BuildConfig`): uncaptioned style documents
    alone until the in-context copy probe reaches its target, then documents and captions. An LMM trained on
    captions copies a context image's style from its caption but not from its visual tokens; documents with no
    caption to copy from teach it the latter (docs/toy-world.md)."""
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
                                             "toy CLIP) into a checkpoint folder; the defaults build the committed "
                                             "checkpoints/toy.")
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
    for kv in a.set:
        try:
            cfg = parse_setting(cfg, kv)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    if a.no_figures:
        cfg = replace(cfg, figures=False)
    m = build(a.out, cfg, a.data)
    print(json.dumps(m.get("figures", {}), indent=1))


if __name__ == "__main__":
    main()
