"""LaVIT-7B-v2 as a :class:`pigeon_utils.backbone.Backbone`: the world's entry point :func:`load_lavit_backbone`.

:func:`load_lavit_backbone` reads a ``rain1011/LaVIT-7B-v2`` folder (layout in the README) with no hub access:

* ``visual_tokenizer/*.bin`` -> :class:`LaVITVisualTokenizer` (EVA ViT-g + token merger + codebook) and
  :class:`LaVITDetokenizer` (``HighresVQDecoder`` + the codebook rows), through
  :class:`pigeon_utils.lavit.checkpoint.LaVITCheckpoint` (``torch.load(weights_only=True)``; strict where upstream is,
  required keys + reported extras where upstream loads non-strictly).
* ``language_model/`` -> the LLM and its text tokenizer (:mod:`pigeon_utils.lavit.language_model`).
* ``highres_pixel_decoding/`` -> :class:`~pigeon_utils.lavit.pixel_decoder.SDXLPixelDecoder`.

Every missing file raises :class:`~pigeon_utils.lavit.errors.LaVITMissingFileError` and every weight file whose keys
do not fit raises :class:`~pigeon_utils.lavit.errors.LaVITWeightsError` (both
:class:`~pigeon_utils.backbone.CheckpointError`); :func:`check_layout` looks for every file before any weight is read.

Sizes: the real checkpoint has no config file for LaVIT's custom modules, so :meth:`LaVITConfig.real` is used unless
the folder holds ``lavit_config.json`` (written by :mod:`pigeon_utils.lavit.tiny_checkpoint` for the tiny test
checkpoint; see :func:`config_to_dict`).

dtype: fp32 by default on CPU, bf16 by default on CUDA. Like upstream, the custom modules then keep their
LayerNorms, position tables and codebook in fp32, hold Linear / Conv weights in the compute dtype, and run under
``torch.autocast``; the LLM, UNet and VAE are loaded directly in that dtype. ``load_in_8bit=True`` loads the LLM with
bitsandbytes (CUDA only), as Pigeon does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pigeon_utils.backbone import Backbone, CheckpointError, Detokenizer, VisualTokenizer, VisualTokens
from pigeon_utils.lavit.checkpoint import (
    EVA_FILE,
    HIGHRES_DECODER_FILE,
    TOKENIZER_ENCODER_FILE,
    LaVITCheckpoint,
)
from pigeon_utils.lavit.config import DecoderConfig, EVAConfig, LaVITConfig, TokenIds, TokenizerConfig
from pigeon_utils.lavit.decoder import HighresVQDecoder
from pigeon_utils.lavit.errors import LaVITMissingFileError, LaVITWeightsError, checkpoint_errors
from pigeon_utils.lavit.language_model import (
    LANGUAGE_MODEL_DIR,
    check_language_model_files,
    load_language_model,
    load_text_tokenizer,
)
from pigeon_utils.lavit.pixel_decoder import PIXEL_DECODING_DIR, SDXLPixelDecoder, check_pixel_decoder_files
from pigeon_utils.lavit.preprocess import LaVITImageProcessor
from pigeon_utils.lavit.tokenizer import DynamicVisualTokenizer, VectorQuantizer, sample_keep_decision
from pigeon_utils.prompts import LAVIT_LAYOUT, IdLayout

log = logging.getLogger(__name__)

#: Our own file (not in the published checkpoint): the sizes of the custom modules. Absent -> LaVITConfig.real().
CONFIG_FILE = "lavit_config.json"


# ------------------------------------------------------------------------------------------ config file
def config_to_dict(config: LaVITConfig) -> dict[str, Any]:
    """:class:`LaVITConfig` -> JSON-able dict (the content of ``lavit_config.json``)."""
    return dataclasses.asdict(config)


#: nested dataclass fields of the size config
_NESTED = {LaVITConfig: {"tokenizer": TokenizerConfig, "decoder": DecoderConfig, "ids": TokenIds},
           TokenizerConfig: {"encoder": EVAConfig}}


def config_from_dict(data: dict[str, Any], source: str = CONFIG_FILE) -> LaVITConfig:
    """Inverse of :func:`config_to_dict`; an unknown field or a wrong type raises ``ValueError`` naming it."""

    def build(cls, raw: Any, where: str):
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: {where} must be an object, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown} in {where} ({cls.__name__})")
        nested = _NESTED.get(cls, {})
        kwargs = {k: build(nested[k], v, f"{where}.{k}") if k in nested else tuple(v) if isinstance(v, list) else v
                  for k, v in raw.items()}
        return cls(**kwargs)

    return build(LaVITConfig, data, "config")


def read_lavit_config(root: Path) -> LaVITConfig:
    """``<root>/lavit_config.json`` if present (tiny checkpoints), else the real LaVIT-7B-v2 sizes."""
    path = Path(root) / CONFIG_FILE
    if not path.is_file():
        return LaVITConfig.real()
    try:
        return config_from_dict(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid LaVIT size config: {e}. Delete it to use the real "
                              f"LaVIT-7B-v2 sizes, or rewrite it with pigeon_utils.lavit.tiny_checkpoint.") from e


def layout_for(config: LaVITConfig) -> IdLayout:
    """Pigeon's id layout for this LaVIT config (``prompts.LAVIT_LAYOUT`` with the config's ids and codebook size)."""
    ids = config.ids
    return dataclasses.replace(LAVIT_LAYOUT, img_id=ids.image_start, emb_id=ids.image_end,
                               visual_offset=ids.visual_offset, codebook_size=config.tokenizer.n_code,
                               pad_id=ids.pad)


# ------------------------------------------------------------------------------------------ dtype helpers
def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the reference's dtype), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def compute_context(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` in `dtype` on `device` for 16-bit runs (how upstream reconciles its mixed dtypes), else a
    no-op context."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cast_linear_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Upstream ``convert_weights_to_bf16``: only Linear / Conv1d / Conv2d weights and biases take `dtype`; norms,
    position tables, ``q_bias``/``v_bias`` and the codebook stay fp32."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
    return module


# ------------------------------------------------------------------------------------------ visual tokenizer
class LaVITVisualTokenizer(VisualTokenizer):
    """PIL images -> LaVIT visual tokens: bicubic 224 px resize + CLIP normalisation, EVA, Gumbel keep decision,
    token merger, quantizer. ``patch_index`` is the raster index in the 16×16 (real) grid of 14-px patches."""

    def __init__(self, model: DynamicVisualTokenizer, config: LaVITConfig, device: torch.device,
                 dtype: torch.dtype, batch_size: int = 32) -> None:
        self.model = model
        self.config = config
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size = batch_size
        enc = config.tokenizer.encoder
        self.processor = LaVITImageProcessor(enc.img_size, config.image_mean, config.image_std)
        self.codebook_size = config.tokenizer.n_code
        self.grid = (enc.grid, enc.grid)
        self.patch_size = enc.patch_size

    @torch.no_grad()
    def tokenize(self, images: Sequence[Any], generator: torch.Generator | None = None,
                 keep: Tensor | None = None) -> VisualTokens:
        """Tokenize PIL images (or uint8 [H, W, 3] arrays).

        The keep decision is sampled (hard Gumbel, as upstream) with `generator` on the generator's own device, so a
        CPU generator gives the same tokens whatever device the model is on; ``keep`` [B, N] (0/1) fixes it instead.
        Returns CPU tensors.
        """
        images = list(images)
        if not images:
            raise ValueError("tokenize needs at least one image")
        n = self.grid[0] * self.grid[1]
        if keep is not None and tuple(keep.shape) != (len(images), n):
            raise ValueError(f"keep must have shape [B, N] = [{len(images)}, {n}], got {tuple(keep.shape)}")
        codes: list[Tensor] = []
        patches: list[Tensor] = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images[start:start + self.batch_size]).to(self.device)
            with compute_context(self.device, self.dtype):
                features = self.model.encode(pixels)
                if keep is None:
                    scores = self.model.predict_keep_scores(features)
                    gen_device = generator.device if generator is not None else scores.device
                    decision = sample_keep_decision(scores.to(gen_device), generator).to(self.device)
                else:
                    decision = keep[start:start + self.batch_size].to(self.device)
                out = self.model.tokenize_features(features, keep=decision)
            codes += [c.cpu() for c in out.code_ids]
            patches += [p.cpu() for p in out.patch_indices]
        return VisualTokens(codes=codes, patch_index=patches, grid=self.grid, patch_size=self.patch_size)


# ------------------------------------------------------------------------------------------ detokenizer
class LaVITDetokenizer(Detokenizer):
    """Code ids -> ``(prompt_embeds [B, 256, 2048], pooled [B, 1280])`` (real sizes): codebook rows, then the frozen
    ``HighresVQDecoder``.

    Only the real tokens (``mask``) are used, compacted in order (so a mask with holes behaves like Pigeon's
    "drop the masked tokens"); at most ``num_queries`` (256) per image are kept, the first ones, as Pigeon truncates.
    """

    def __init__(self, decoder: HighresVQDecoder, codebook: VectorQuantizer, dtype: torch.dtype = torch.float32
                 ) -> None:
        super().__init__()
        self.decoder = decoder.requires_grad_(False).eval()
        self.codebook = codebook.requires_grad_(False).eval()
        self.dtype = dtype
        cfg = decoder.cfg
        self.cond_dim, self.pooled_dim = cfg.prompt_dim, cfg.pooled_dim
        self.max_tokens = cfg.num_queries
        self.codebook_size = codebook.n_code

    def forward(self, codes: Tensor, mask: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if codes.dim() != 2 or mask.shape != codes.shape:
            raise ValueError(f"codes and mask must both be [B, T]; got {tuple(codes.shape)} and {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
        real = codes[mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.codebook_size):
            raise ValueError(f"code ids must lie in [0, {self.codebook_size}) where mask is True; found "
                             f"{int(real.min())}..{int(real.max())} (pass codes, not LMM ids = "
                             f"{LAVIT_LAYOUT.visual_offset} + code)")
        mask = mask & (mask.long().cumsum(dim=1) <= self.max_tokens)
        rows = self.codebook(codes[mask])
        if weights is not None:  # straight-through keep values (1 forward) scale the codebook rows
            rows = rows * weights[mask].unsqueeze(-1).to(rows.dtype)
        device = rows.device
        with compute_context(device, self.dtype):
            cond, pooled = self.decoder(rows, mask.sum(dim=1))
        return cond, pooled


# ------------------------------------------------------------------------------------------ entry point
def check_layout(ckpt: LaVITCheckpoint) -> None:
    """Check that every file the backbone reads exists (no weights are read); the first missing one raises
    :class:`LaVITMissingFileError` with the expected layout and the download source."""
    with checkpoint_errors():
        ckpt.require_dirs((LANGUAGE_MODEL_DIR, PIXEL_DECODING_DIR))
        for folder, stem in (EVA_FILE, TOKENIZER_ENCODER_FILE, HIGHRES_DECODER_FILE):
            ckpt.weight_file(folder, stem, role=f"LaVIT custom weights {stem}")
    check_language_model_files(ckpt.root)
    check_pixel_decoder_files(ckpt.root)


def load_lavit_backbone(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, load_in_8bit: bool = False,
                        lazy_pixel_decoder: bool = False) -> Backbone:
    """Load the whole LaVIT-7B-v2 backbone from a local checkpoint folder (the README's layout), with no hub access.

    `dtype` defaults to bf16 on CUDA and fp32 on CPU. `load_in_8bit` loads the LLM with bitsandbytes (CUDA only).
    `lazy_pixel_decoder` defers reading the UNet / VAE weights to the first decode (training needs none).
    ``extras``: ``config`` (:class:`LaVITConfig`), ``dtype``, ``load_reports`` (what each custom weight file filled,
    with its unexpected keys).
    """
    root = Path(checkpoint_dir)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if not root.is_dir():
        raise LaVITMissingFileError(root, root, "the checkpoint folder itself")
    config = read_lavit_config(root)
    layout = layout_for(config)
    with checkpoint_errors():
        ckpt = LaVITCheckpoint(root, config)
        check_layout(ckpt)  # every file first, before reading gigabytes of weights
        tok_model, reports = ckpt.load_visual_tokenizer(for_understanding=False)
        decoder = ckpt.load_highres_decoder()
    for rep in reports:
        if rep.unexpected_keys:
            log.warning("%s: %d unexpected keys (reported, not used): %s", rep.path, len(rep.unexpected_keys),
                        rep.unexpected_keys[:20])
    codebook = VectorQuantizer(config.tokenizer.n_code, config.tokenizer.code_dim)
    codebook.load_state_dict(tok_model.quantize.state_dict())
    if dtype != torch.float32:
        cast_linear_weights(tok_model, dtype)
        cast_linear_weights(decoder, dtype)
    tok_model = tok_model.to(device).requires_grad_(False).eval()
    detok = LaVITDetokenizer(decoder, codebook, dtype).to(device)
    text_tok = load_text_tokenizer(root, layout)
    llm = load_language_model(root, device, dtype, load_in_8bit, min_vocab=layout.vocab_size)
    pixel = SDXLPixelDecoder(root, device, dtype, detok.cond_dim, detok.pooled_dim, lazy=lazy_pixel_decoder)
    return Backbone(
        preset="lavit",
        tokenizer=LaVITVisualTokenizer(tok_model, config, device, dtype),
        lmm=llm,
        text_tokenizer=text_tok,
        layout=layout,
        detokenizer=detok,
        pixel_decoder=pixel,
        checkpoint_dir=root,
        extras={"config": config, "dtype": dtype, "load_reports": list(reports)},
    )


__all__ = [
    "CONFIG_FILE",
    "LaVITDetokenizer",
    "LaVITMissingFileError",
    "LaVITVisualTokenizer",
    "LaVITWeightsError",
    "cast_linear_weights",
    "check_layout",
    "compute_context",
    "config_from_dict",
    "config_to_dict",
    "default_dtype",
    "layout_for",
    "load_lavit_backbone",
    "read_lavit_config",
]
