"""The backbone interface: the four parts Pigeon's logic talks to, whatever the world.

* :class:`VisualTokenizer` — images -> one LongTensor of code ids per image (variable length), plus the patch
  each kept token comes from (for mask figures) and ``codebook_size``.
* the LMM — a ``transformers`` ``LlamaForCausalLM`` with a text tokenizer and LaVIT's id layout
  (:class:`pigeon_utils.prompts.IdLayout`: text ids, then ``[IMG]`` = ``<img>``, ``[/IMG]`` = ``<emb>``, then
  visual id = ``visual_offset + code``; pad = ``</s>``).
* :class:`Detokenizer` — code ids (right-padded batch + mask) -> conditioning embeddings ``[B, T, D]`` and a pooled
  vector ``[B, D']``; the mean of the embeddings over ``T`` is what Pigeon's adapter MLP maps into the ``<emb>`` slot.
* :class:`PixelDecoder` — a ``diffusers`` UNet + scheduler (+ VAE) that turns the conditioning into pixels.

Pigeon never branches on the world: anything a backbone needs at generation time (the toy's "positions must
increase" rule) comes from :meth:`Backbone.visual_logits_processor`, which returns ``None`` when there is none.

:func:`pigeon_utils.worlds.load_backbone` builds one from a checkpoint folder; this module only defines the parts.
A missing or damaged file raises :class:`CheckpointError`, naming the file and saying how to rebuild or fetch it.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import torch
from torch import Tensor, nn

from pigeon_utils.prompts import IdLayout

class CheckpointError(FileNotFoundError):
    """A checkpoint folder or one of its files is missing or damaged; the message names the file and the fix."""


# ------------------------------------------------------------------------------------------ tokens
@dataclass
class VisualTokens:
    """The visual tokens of a batch of images.

    ``codes[i]``: LongTensor [n_i] of code ids in ``[0, codebook_size)`` (LMM id = ``layout.visual_offset + code``).
    ``patch_index[i]``: LongTensor [n_i], the raster index of the patch each token comes from in a
    ``grid[0] × grid[1]`` patch grid, or -1 for a token that stands for the whole image (the toy's background
    token). ``patch_size``: patch side in pixels of the image as tokenized (for overlays).
    """

    codes: list[Tensor]
    patch_index: list[Tensor]
    grid: tuple[int, int]
    patch_size: int

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def counts(self) -> Tensor:
        """Number of tokens per image, LongTensor [B]."""
        return torch.tensor([len(c) for c in self.codes], dtype=torch.long)


def pad_codes(codes: Sequence[Tensor], pad_value: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad variable-length code lists to ``(ids [B, T], mask [B, T] bool)`` (T = the longest list, ≥ 1)."""
    if len(codes) == 0:
        raise ValueError("pad_codes needs at least one code list")
    t = max(1, max(len(c) for c in codes))
    dev = next((c.device for c in codes if isinstance(c, Tensor)), torch.device("cpu"))  # the codes' device
    ids = torch.full((len(codes), t), pad_value, dtype=torch.long, device=dev)
    n = [len(c) for c in codes]
    mask = torch.arange(t, device=dev)[None, :] < torch.tensor(n, device=dev)[:, None]
    if sum(n) > 0:
        ids[mask] = torch.cat([torch.as_tensor(c, dtype=torch.long, device=dev).reshape(-1) for c in codes])
    return ids, mask


# ------------------------------------------------------------------------------------------ parts
class VisualTokenizer(abc.ABC):
    """Images -> :class:`VisualTokens` (a variable number of tokens per image, LaVIT's dynamic tokenizer role)."""

    codebook_size: int

    @abc.abstractmethod
    def tokenize(self, images: Sequence[Any]) -> VisualTokens:
        """Tokenize PIL images (or uint8 arrays [H, W, 3])."""


class Detokenizer(nn.Module, abc.ABC):
    """Code ids -> ``(cond [B, T, D], pooled [B, D'])`` for the pixel decoder (LaVIT's ``HighresVQDecoder`` role)."""

    cond_dim: int
    pooled_dim: int

    @abc.abstractmethod
    def forward(self, codes: Tensor, mask: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``codes`` [B, T] (right-padded) and ``mask`` [B, T] (True = real token).

        ``weights`` [B, T] (optional) scale each token's input embedding: Pigeon passes the reference's
        straight-through keep values (1 in the forward pass), so the SFT loss reaches the mask generator
        through the reference tokens too (docs/algorithm.md §2.8)."""

    def embed(self, codes: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Convenience: pad a list of code tensors and run :meth:`forward`."""
        ids, mask = pad_codes(codes)
        p = next(self.parameters())
        return self(ids.to(p.device), mask.to(p.device))


def to_uint8(images: Tensor) -> np.ndarray:
    """Float images [B, 3, H, W] in [0, 1] (what a :class:`PixelDecoder` returns) → uint8 [B, H, W, 3] on the CPU."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class PixelDecoder(abc.ABC):
    """Conditioning -> images with a diffusion model (LaVIT: SDXL-architecture UNet + DDIM + VAE)."""

    @abc.abstractmethod
    def decode(self, cond: Tensor, pooled: Tensor, generator: torch.Generator | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               noise: Tensor | None = None) -> Tensor:
        """Images as float [B, 3, H, W] in [0, 1]; deterministic given `generator`. `noise`: the initial latents'
        standard-normal draw (:meth:`draw_noise`), instead of drawing it from `generator`."""

    @abc.abstractmethod
    def draw_noise(self, n: int, generator: torch.Generator | None = None, **size) -> Tensor:
        """The standard-normal initial latents of `n` images that :meth:`decode` draws from `generator` (on the
        CPU); decoding images with their noise drawn apart gives each image the noise of its own generator."""


@dataclass
class Backbone:
    """The four parts of one world, plus its id layout and an optional generation-time logits processor."""

    preset: str
    tokenizer: VisualTokenizer
    lmm: nn.Module  # transformers.LlamaForCausalLM
    text_tokenizer: Any  # transformers.PreTrainedTokenizerFast
    layout: IdLayout
    detokenizer: Detokenizer
    pixel_decoder: PixelDecoder
    checkpoint_dir: Path
    extras: dict = field(default_factory=dict)

    def visual_logits_processor(self):
        """A ``transformers`` ``LogitsProcessor`` that keeps generated visual ids valid for this world, or None."""
        make = self.extras.get("logits_processor")
        return make() if make is not None else None

    def encode_text(self, text: str) -> list[int]:
        """Text -> ids without BOS (what :func:`pigeon_utils.prompts.encode_prompt` expects)."""
        return self.text_tokenizer(text, add_special_tokens=False)["input_ids"]

    def visual_ids(self, tokens: VisualTokens) -> list[Tensor]:
        """Code ids -> LMM ids (``visual_offset + code``) per image."""
        return [c + self.layout.visual_offset for c in tokens.codes]

    @torch.no_grad()
    def decode_codes(self, codes: Sequence[Tensor], generator: torch.Generator | None = None, **kw) -> Tensor:
        """Code ids per image -> images [B, 3, H, W] in [0, 1] (detokenizer, then pixel decoder)."""
        cond, pooled = self.detokenizer.embed(codes)
        return self.pixel_decoder.decode(cond, pooled, generator=generator, **kw)
