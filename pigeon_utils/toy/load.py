"""Loading the toy backbone (and the toy CLIP) from a checkpoint folder, with clear errors.

Layout of ``checkpoints/toy`` (written by :mod:`pigeon_utils.toy.build`)::

    manifest.json                         seed, recipe, library versions, sha256 of every file, build figures
    visual_tokenizer/{config.json, model.safetensors}
    text_tokenizer/{tokenizer.json, tokenizer_config.json}
    language_model/{config.json, generation_config.json, model.safetensors}     (LlamaForCausalLM)
    detokenizer/{config.json, model.safetensors}
    pixel_decoder/config.json, unet/{config.json, diffusion_pytorch_model.safetensors},
                  scheduler/scheduler_config.json, vae/{config.json, model.safetensors}
    clip/{open_clip_config.json, model.safetensors}

Every file is checked before anything is built: a missing one, or one whose sha256 differs from the manifest,
raises :class:`~pigeon_utils.backbone.CheckpointError` naming it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pigeon_utils.backbone import Backbone, CheckpointError
from pigeon_utils.toy.io import REBUILD, read_json, require_file, sha256

REQUIRED_FILES = (
    "manifest.json",
    "visual_tokenizer/config.json", "visual_tokenizer/model.safetensors",
    "text_tokenizer/tokenizer.json", "text_tokenizer/tokenizer_config.json",
    "language_model/config.json", "language_model/model.safetensors",
    "detokenizer/config.json", "detokenizer/model.safetensors",
    "pixel_decoder/config.json", "pixel_decoder/unet/config.json",
    "pixel_decoder/unet/diffusion_pytorch_model.safetensors", "pixel_decoder/scheduler/scheduler_config.json",
    "pixel_decoder/vae/config.json", "pixel_decoder/vae/model.safetensors",
    "clip/open_clip_config.json", "clip/model.safetensors",
)


def verify_checkpoint(folder: Path, check_hashes: bool = True) -> dict:
    """Check that every required file exists and (optionally) matches the manifest's sha256; return the manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: toy checkpoint folder not found; {REBUILD}")
    for rel in REQUIRED_FILES:
        require_file(folder / rel)
    manifest = read_json(folder / "manifest.json")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{folder / 'manifest.json'}: damaged checkpoint file (no 'files' table); {REBUILD}")
    if check_hashes:
        for rel, digest in files.items():
            p = require_file(folder / rel)
            if sha256(p) != digest:
                raise CheckpointError(f"{p}: damaged checkpoint file (sha256 differs from manifest.json); {REBUILD}")
    return manifest


def load_text_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        require_file(folder / f)
    try:
        return PreTrainedTokenizerFast.from_pretrained(folder)
    except Exception as e:  # tokenizers raises a bare Exception for a broken tokenizer.json
        raise CheckpointError(f"{folder / 'tokenizer.json'}: damaged checkpoint file ({e}); {REBUILD}") from None


def load_language_model(folder: Path):
    from transformers import LlamaForCausalLM

    folder = Path(folder)
    for f in ("config.json", "model.safetensors"):
        require_file(folder / f)
    try:
        return LlamaForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    except Exception as e:  # transformers raises several types for a broken file
        raise CheckpointError(f"{folder / 'model.safetensors'}: damaged checkpoint ({type(e).__name__}: {e}); "
                              f"{REBUILD}") from None


def load_toy_backbone(folder: Path, device: str | torch.device = "cpu", check_hashes: bool = True) -> Backbone:
    """The toy :class:`~pigeon_utils.backbone.Backbone` from `folder` (e.g. ``checkpoints/toy``)."""
    from pigeon_utils.toy.decoder import ToyPixelDecoder
    from pigeon_utils.toy.detokenizer import ToyDetokenizer
    from pigeon_utils.toy.lmm import ToyVisualGrammar
    from pigeon_utils.toy.text import layout_for
    from pigeon_utils.toy.tokenizer import ToyVisualTokenizer

    folder = Path(folder)
    manifest = verify_checkpoint(folder, check_hashes=check_hashes)
    tokenizer = ToyVisualTokenizer.from_pretrained(folder / "visual_tokenizer")
    text_tokenizer = load_text_tokenizer(folder / "text_tokenizer")
    layout = layout_for(text_tokenizer, tokenizer.codebook_size)
    lmm = load_language_model(folder / "language_model").to(device)
    if lmm.config.vocab_size != layout.vocab_size:
        raise CheckpointError(f"{folder / 'language_model/config.json'}: vocab_size {lmm.config.vocab_size} does not "
                              f"match the tokenizers' layout ({layout.vocab_size}); {REBUILD}")
    detok = ToyDetokenizer.from_pretrained(folder / "detokenizer").to(device)
    decoder = ToyPixelDecoder.from_pretrained(folder / "pixel_decoder")
    decoder.unet.to(device)
    decoder.vae.to(device)
    position = tokenizer.code_table()["position"]
    return Backbone(preset="toy", tokenizer=tokenizer, lmm=lmm, text_tokenizer=text_tokenizer, layout=layout,
                    detokenizer=detok, pixel_decoder=decoder, checkpoint_dir=folder,
                    extras={"logits_processor": lambda: ToyVisualGrammar(layout, position), "manifest": manifest})


def load_toy_clip(folder: Path, text_tokenizer=None):
    """The toy CLIP (:class:`pigeon_utils.toy.clip.ToyClip`) from ``<folder>/clip``."""
    from pigeon_utils.toy.clip import ToyClip

    folder = Path(folder)
    if text_tokenizer is None:
        text_tokenizer = load_text_tokenizer(folder / "text_tokenizer")
    return ToyClip.from_pretrained(folder / "clip", text_tokenizer)
