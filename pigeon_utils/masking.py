"""Pigeon's mutual mask generator: the scorer of the mask generation module (docs/algorithm.md §2).

The mask generator decides, for every sample, which visual tokens of the five history images and of the
reference image are kept. This module holds its ``nn.Module`` side, :class:`MutualMaskGenerator`
(docs/algorithm.md §2.1): a one-layer transformer encoder reads the LLaMA input embeddings ``e_i`` of all
visual tokens of one sample (history images, then the target/reference image), each with a sinusoidal position
embedding (:class:`PositionalEncoding`; positions restart at 1 for every image) and a type embedding (0 pad,
1 history, 2 target). Its contextual output ``o_i`` is compared with the raw embedding: ``s_i = cos(e_i, o_i)``
(:class:`~pigeon_utils.keep.MaskScores`).

The keep decisions made from these scores — keep probabilities, Gumbel top-k, the straight-through and
reference modes, the other mask types and the layout helpers — are in :mod:`pigeon_utils.keep`;
:meth:`MutualMaskGenerator.forward` chains the scorer with them and returns a :class:`~pigeon_utils.keep.KeepMask`.

Inputs are batched: samples are right-padded to a common length ``L``; ``padding_mask`` (True = padding, as in
``nn.TransformerEncoder``), ``position_ids`` and ``type_ids`` are ``[B, L]`` (see
:func:`pigeon_utils.keep.layout_from_counts`).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from pigeon_utils.keep import (HIST_TYPE, TARGET_TYPE, KeepMask, MaskScores, check_batch_shape, check_layout,
                               check_ratio, gumbel_topk_keep, keep_probabilities)

__all__ = [
    "UPSTREAM_POSITION_ROWS",
    "DEFAULT_POSITION_ROWS",
    "sinusoidal_table",
    "PositionalEncoding",
    "MutualMaskGenerator",
]

#: Rows of the sinusoidal position table in the released code (MMG:12, 34): indices 0..256.
UPSTREAM_POSITION_ROWS = 257
#: Rows needed: a reference image has at most 256 codes plus ``[IMG]``/``[/IMG]`` in the generator's input, so
#: positions run up to 258 (docs/algorithm.md §2.2, §8.8; docs/deviations.md M1); row 0 serves padding. Hence
#: 259 rows (indices 0..258).
DEFAULT_POSITION_ROWS = 259


# ----------------------------------------------------------------------------------------------------------
# position table
# ----------------------------------------------------------------------------------------------------------
def sinusoidal_table(rows: int, dim: int, *, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The fixed sin/cos table (base 10000) of the mask generator, ``[rows, dim]`` (float32 by default).

    Row ``p`` holds ``sin(p·ω_j)`` in the even and ``cos(p·ω_j)`` in the odd columns, with
    ``ω_j = exp(−2j·ln(10000)/dim)``, computed with the same operations as the released code. float32 results
    of different torch builds differ by a few 1e-6 at large p (one ulp of ``ω_j`` times p), so stored tables
    are compared with a tolerance, never bit for bit.
    """
    if rows < 1:
        raise ValueError(f"the position table needs at least one row, got rows={rows}")
    if dim < 2 or dim % 2:
        raise ValueError(f"the sinusoidal position table needs an even embedding width, got dim={dim}")
    position = torch.arange(0, rows, dtype=dtype, device=device).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device).to(dtype) * (-math.log(10000.0) / dim))
    table = torch.zeros(rows, dim, device=device, dtype=dtype)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq)
    return table


_PE_ATOL = {torch.float64: 1e-4, torch.float32: 1e-4}


class PositionalEncoding(nn.Module):
    """Sinusoidal position table as a persistent buffer ``pe`` (state-dict key ``position_embedding.pe``).

    ``max_positions`` is the number of rows (default :data:`DEFAULT_POSITION_ROWS` = 259). Loading a state dict
    whose ``pe`` has another number of rows — a released Pigeon checkpoint has 257 — is accepted when every
    stored row equals :func:`sinusoidal_table` within float rounding (atol 1e-4 for fp32, 1e-2 for 16-bit
    tables); the buffer is deterministic, so nothing is lost: our own, full-size table is kept. A stored table
    that differs from the formula raises ``ValueError``. A valid same-size table loads as stored.
    """

    def __init__(self, dim: int, max_positions: int = DEFAULT_POSITION_ROWS):
        super().__init__()
        self.dim = int(dim)
        self.max_positions = int(max_positions)
        self.register_buffer("pe", sinusoidal_table(self.max_positions, self.dim), persistent=True)

    def forward(self, position_ids: Tensor) -> Tensor:
        if not position_ids.is_meta and position_ids.numel():
            lo, hi = int(position_ids.min()), int(position_ids.max())
            if lo < 0:
                raise IndexError(f"position ids must be >= 0 (0 = padding), got {lo}")
            if hi >= self.pe.shape[0]:
                raise IndexError(f"position id {hi} is outside the position table (rows 0..{self.pe.shape[0] - 1}); "
                                 f"build the MutualMaskGenerator with max_positions >= {hi + 1}")
        return self.pe[position_ids]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "pe"
        stored = state_dict.get(key)
        if isinstance(stored, Tensor):
            if stored.dim() != 2 or stored.shape[1] != self.dim:
                raise ValueError(f"{key}: stored position table has shape {tuple(stored.shape)}, expected "
                                 f"[rows, {self.dim}]")
            if not (stored.is_meta or self.pe.is_meta):
                expected = sinusoidal_table(stored.shape[0], self.dim, dtype=torch.float64)
                got = stored.detach().to("cpu", torch.float64)
                # fp32 rounding of p·ω_j reaches ~3e-5 at p = 256; a wrong formula is off by O(0.1).
                atol = _PE_ATOL.get(stored.dtype, 1e-2)
                if not torch.allclose(got, expected, atol=atol, rtol=0.0):
                    dev = (got - expected).abs().max().item()
                    raise ValueError(f"{key}: the stored {stored.shape[0]}-row position table is not the "
                                     f"sinusoidal table (max |difference| {dev:.3g}); refusing to replace it")
            if stored.shape != self.pe.shape:
                # Deterministic buffer: keep our own (larger or smaller) table instead of the stored one.
                state_dict[key] = self.pe.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# ----------------------------------------------------------------------------------------------------------
# the scorer
# ----------------------------------------------------------------------------------------------------------
class MutualMaskGenerator(nn.Module):
    """Pigeon's mutual mask generator (docs/algorithm.md §2.1), with the upstream state-dict names.

    Parameters follow ``MutualMaskGenerator(emb_dim, num_heads, num_layers, drop_prob, eps)`` of the released
    code (MMG:26-40): ``emb_dim`` = LLM width (4096 for LaVIT-7B), one ``nn.TransformerEncoderLayer`` with
    PyTorch's defaults (FFN ``dim_feedforward`` = 2048 whatever the width, dropout 0.1, ReLU, post-norm,
    batch-first), a type embedding with 3 rows (0 pad, 1 history, 2 target), **one** LayerNorm (``eps``)
    shared by input and output, ``dense`` + tanh head and Dropout(``drop_prob``).

    ``max_positions``: rows of the sinusoidal table (default 259, the released code has 257 — too few, see
    :data:`DEFAULT_POSITION_ROWS`). A 257-row checkpoint loads strictly (see :class:`PositionalEncoding`);
    :meth:`upstream_state_dict` writes one that the released code can load.

    ``forward`` = :meth:`score` + :func:`~pigeon_utils.keep.keep_probabilities` +
    :func:`~pigeon_utils.keep.gumbel_topk_keep` for both groups and returns a
    :class:`~pigeon_utils.keep.KeepMask`.
    """

    def __init__(self, emb_dim: int, num_heads: int = 4, num_layers: int = 1, drop_prob: float = 0.2,
                 eps: float = 1e-5, max_positions: int = DEFAULT_POSITION_ROWS, dim_feedforward: int = 2048):
        super().__init__()
        if int(emb_dim) != emb_dim or emb_dim < 2 or emb_dim % 2:
            raise ValueError(f"emb_dim must be a positive even integer, got {emb_dim!r}")
        if int(num_heads) != num_heads or num_heads < 1 or emb_dim % num_heads:
            raise ValueError(f"num_heads must be a positive divisor of emb_dim={emb_dim}, got {num_heads!r}")
        if int(num_layers) != num_layers or num_layers < 1:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        if not (0.0 <= float(drop_prob) < 1.0):
            raise ValueError(f"drop_prob must lie in [0, 1), got {drop_prob!r}")
        if int(max_positions) != max_positions or max_positions < 2:
            raise ValueError(f"max_positions (rows of the position table) must be an integer >= 2, "
                             f"got {max_positions!r}")
        self.emb_dim, self.num_heads, self.num_layers = int(emb_dim), int(num_heads), int(num_layers)
        layer = nn.TransformerEncoderLayer(d_model=self.emb_dim, nhead=self.num_heads,
                                           dim_feedforward=dim_feedforward, dropout=0.1, activation="relu",
                                           layer_norm_eps=1e-5, batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers=self.num_layers, enable_nested_tensor=False)
        self.position_embedding = PositionalEncoding(self.emb_dim, int(max_positions))
        self.type_embedding = nn.Embedding(3, self.emb_dim)
        self.dense = nn.Linear(self.emb_dim, self.emb_dim)
        self.activation = nn.Tanh()
        self.LayerNorm = nn.LayerNorm(self.emb_dim, eps=eps)
        self.dropout = nn.Dropout(float(drop_prob))

    @property
    def max_positions(self) -> int:
        return self.position_embedding.max_positions

    # -- scoring ------------------------------------------------------------------------------------------
    def get_input_embeds(self, token_embeds: Tensor, position_ids: Tensor, type_ids: Tensor) -> Tensor:
        """x = Dropout(LN(e + PE[pos] + T[type]))."""
        x = token_embeds + self.position_embedding(position_ids) + self.type_embedding(type_ids)
        return self.dropout(self.LayerNorm(x))

    def get_output_embeds(self, input_embeds: Tensor, padding_mask: Tensor) -> Tensor:
        """o = Dropout(tanh(dense(LN(Encoder(x, key_padding_mask))))) — the same LayerNorm as the input."""
        h = self.encoder(input_embeds, src_key_padding_mask=padding_mask)
        return self.dropout(self.activation(self.dense(self.LayerNorm(h))))

    def score(self, token_embeds: Tensor, padding_mask: Tensor, position_ids: Tensor,
              type_ids: Tensor) -> MaskScores:
        """Run the scorer. ``token_embeds`` [B, L, D] (cast to the generator's dtype, docs/algorithm.md §8.19),
        ``padding_mask`` [B, L] bool (True = padding), ``position_ids`` [B, L] (1..n per image, 0 at padding),
        ``type_ids`` [B, L] (1 history, 2 target, 0 padding).

        Padded positions cannot influence non-padded ones (they are excluded as attention keys and every other
        operation is per token); their ``output_embeds`` and ``cos_sim`` are set to 0.
        """
        if token_embeds.dim() != 3 or token_embeds.shape[-1] != self.emb_dim:
            raise ValueError(f"token_embeds must have shape (batch, length, {self.emb_dim}), got "
                             f"{tuple(token_embeds.shape)}")
        shape = token_embeds.shape[:2]
        check_batch_shape("type_ids", type_ids, shape)
        check_batch_shape("position_ids", position_ids, shape)
        check_layout(type_ids, padding_mask)
        e = token_embeds.to(self.dense.weight.dtype)
        x = self.get_input_embeds(e, position_ids, type_ids)
        o = self.get_output_embeds(x, padding_mask)
        pad = padding_mask.unsqueeze(-1)
        o = o.masked_fill(pad, 0.0)
        cos = F.cosine_similarity(e, o, dim=-1).masked_fill(padding_mask, 0.0)
        return MaskScores(input_embeds=x, output_embeds=o, cos_sim=cos)

    def forward(self, token_embeds: Tensor, padding_mask: Tensor, position_ids: Tensor, type_ids: Tensor, *,
                ref_mask_ratio: float, hist_mask_ratio: float = 0.2, inference: bool = True,
                straight_through: bool = True, tau: float = 1.0, generator: Optional[torch.Generator] = None,
                hist_exponential: Optional[Tensor] = None,
                target_exponential: Optional[Tensor] = None) -> KeepMask:
        """Keep decisions for history (α_h = ``hist_mask_ratio``) and target/reference (α_r = ``ref_mask_ratio``).

        ``inference``: target keep probability ``p`` (True) or ``1 − p`` (False, training;
        docs/algorithm.md §2.3).
        ``straight_through``: see :mod:`pigeon_utils.keep`; ``False`` = reference behaviour (hard mask, and the
        scorer runs without autograd, so the generator gets no gradient).
        Noise: ``hist_exponential`` / ``target_exponential`` ([B, L] Exp(1) samples, only the group's positions
        are read) inject it; otherwise it is drawn from ``generator`` (or torch's default RNG), history first.
        """
        hist_mask_ratio = check_ratio("hist_mask_ratio", hist_mask_ratio)
        ref_mask_ratio = check_ratio("ref_mask_ratio", ref_mask_ratio)
        with torch.set_grad_enabled(torch.is_grad_enabled() and straight_through):
            scores = self.score(token_embeds, padding_mask, position_ids, type_ids)
            hist_q, target_q = keep_probabilities(scores.cos_sim, type_ids, inference=inference)
            hist_keep, k_h = gumbel_topk_keep(hist_q, type_ids == HIST_TYPE, hist_mask_ratio, tau=tau,
                                              exponential=hist_exponential, generator=generator,
                                              straight_through=straight_through)
            target_keep, k_t = gumbel_topk_keep(target_q, type_ids == TARGET_TYPE, ref_mask_ratio, tau=tau,
                                                exponential=target_exponential, generator=generator,
                                                straight_through=straight_through)
        return KeepMask(keep=hist_keep + target_keep, hist_keep_count=k_h, target_keep_count=k_t,
                        hist_keep_prob=hist_q, target_keep_prob=target_q, scores=scores)

    # -- checkpoints --------------------------------------------------------------------------------------
    def upstream_state_dict(self) -> dict[str, Tensor]:
        """State dict in the released layout: ``position_embedding.pe`` cut (or extended) to 257 rows."""
        sd = dict(self.state_dict())
        sd["position_embedding.pe"] = sinusoidal_table(UPSTREAM_POSITION_ROWS, self.emb_dim).to(
            device=self.position_embedding.pe.device, dtype=self.position_embedding.pe.dtype)
        return sd

    def load_upstream_state_dict(self, state_dict: Mapping[str, Tensor], strict: bool = True):
        """Load a released ``mask_generator`` state dict (257-row position table accepted, see
        :class:`PositionalEncoding`). Upstream loads it non-strictly; we default to strict."""
        return self.load_state_dict(dict(state_dict), strict=strict)
