"""Pigeon's mask generation module (spec ``pigeon-algorithm.md`` §2).

The mask generator decides, for every sample, which visual tokens of the five history images and of the
reference image are kept. It has three parts:

1. **Scoring** (:class:`MutualMaskGenerator`, spec §2.1). A one-layer transformer encoder reads the LLaMA
   input embeddings ``e_i`` of all visual tokens of one sample (history images, then the target/reference
   image), each with a sinusoidal position embedding (positions restart at 1 for every image) and a type
   embedding (0 pad, 1 history, 2 target). Its contextual output ``o_i`` is compared with the raw embedding:
   ``s_i = cos(e_i, o_i)``.
2. **Keep probabilities** (:func:`keep_probabilities`, spec §2.3). A softmax of ``s`` within each group:
   𝓗 (all history tokens of a sample, pooled over the five images) and 𝓣 (the target/reference tokens).
   History: ``q_i = p_i``. Target: ``q_i = p_i`` at inference and ``q_i = 1 − p_i`` in training.
3. **Gumbel top-k** (:func:`gumbel_topk_keep`, spec §2.4). Per sample and group, with ``n = |group|`` and mask
   ratio ``r`` (α_h = ``hist_mask_ratio`` for 𝓗, α_r = ``ref_mask_ratio`` for 𝓣), keep
   ``k = max(1, int(n · (1 − r)))`` tokens: the top-k of ``(log q_i + g_i) / τ`` with Gumbel noise
   ``g_i = −log(e_i)``, ``e_i ~ Exp(1)`` (sampling k tokens without replacement ∝ q).

Everything is vectorised over the batch: samples are right-padded to a common length ``L`` and a boolean
``padding_mask`` (True = padding, as in ``nn.TransformerEncoder``) marks the padding. There is no Python loop
over samples or tokens; the per-row top-k uses a sort and a rank comparison ``rank < k_row``.

Two modes (``straight_through``):

* ``True`` (default, the fix of spec §2.8 / §10.1): the keep value is the straight-through estimator
  ``y_hard + (y_soft − stopgrad(y_soft))``. Its forward value is exactly the hard 0/1 decision, but its
  gradient is that of the soft Gumbel-softmax, so when the keep values *multiply* the token embeddings
  (:func:`apply_keep`) the LLM loss reaches the generator's parameters.
* ``False`` (the reference behaviour): a hard 0/1 mask without any autograd graph. The released code only
  compares the decision with 0, so its generator never receives a gradient and stays at its initialisation.

Mask types (:func:`generate_keep_mask`, spec §2.9): ``"mutual"`` (the generator above), ``"random"`` (no
history masking; ``ceil(n·α_r)`` uniformly random reference tokens masked) and ``"none"`` (keep everything).

Layout helpers: :func:`layout_from_counts` builds ``position_ids`` / ``type_ids`` / ``padding_mask`` from the
per-image token counts of each sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MASK_TYPES",
    "PAD_TYPE",
    "HIST_TYPE",
    "TARGET_TYPE",
    "UPSTREAM_POSITION_ROWS",
    "DEFAULT_POSITION_ROWS",
    "sinusoidal_table",
    "PositionalEncoding",
    "MaskScores",
    "KeepMask",
    "MutualMaskGenerator",
    "keep_count",
    "random_mask_count",
    "masked_softmax",
    "keep_probabilities",
    "gumbel_topk_keep",
    "random_reference_keep",
    "generate_keep_mask",
    "apply_keep",
    "layout_from_counts",
]

MASK_TYPES = ("mutual", "random", "none")
PAD_TYPE, HIST_TYPE, TARGET_TYPE = 0, 1, 2

#: Rows of the sinusoidal position table in the released code (MMG:12, 34): indices 0..256.
UPSTREAM_POSITION_ROWS = 257
#: Rows needed: a reference image has at most 256 codes plus ``[IMG]``/``[/IMG]`` in the generator's input, so
#: positions run up to 258 (spec §2.2 [BUG], §10.8); row 0 serves padding. Hence 259 rows (indices 0..258).
DEFAULT_POSITION_ROWS = 259


# ----------------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------------
def _check_ratio(name: str, value) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a single number in [0, 1], got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r} ({type(value).__name__})")
    value = float(value)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return value


def _check_tau(tau) -> float:
    tau = float(tau)
    if not (tau > 0.0 and math.isfinite(tau)):
        raise ValueError(f"tau (Gumbel-softmax temperature) must be a positive finite number, got {tau!r}")
    return tau


def _check_2d(name: str, t: Tensor, shape: torch.Size) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (batch, length), got {tuple(t.shape)}")


def _check_layout(type_ids: Tensor, padding_mask: Tensor) -> None:
    if type_ids.dim() != 2:
        raise ValueError(f"type_ids must have shape (batch, length), got {tuple(type_ids.shape)}")
    _check_2d("padding_mask", padding_mask, type_ids.shape)
    if padding_mask.dtype != torch.bool:
        raise TypeError(f"padding_mask must be a bool tensor (True = padding), got dtype {padding_mask.dtype}")
    if type_ids.dtype.is_floating_point or type_ids.dtype == torch.bool:
        raise TypeError(f"type_ids must be an integer tensor, got dtype {type_ids.dtype}")
    if type_ids.is_meta:
        return
    bad_type = (type_ids < PAD_TYPE) | (type_ids > TARGET_TYPE)
    if bool(bad_type.any()):
        raise ValueError(f"type_ids must be 0 (pad), 1 (history) or 2 (target); found "
                         f"{sorted(set(type_ids[bad_type].tolist()))}")
    if bool(((type_ids == PAD_TYPE) != padding_mask).any()):
        raise ValueError("type_ids and padding_mask disagree: padding_mask must be True exactly where "
                         "type_ids == 0 (pad)")


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
# outputs
# ----------------------------------------------------------------------------------------------------------
@dataclass
class MaskScores:
    """Scorer outputs, all ``[B, L(, D)]``; padded positions hold zeros in ``output_embeds`` and ``cos_sim``."""

    input_embeds: Tensor   #: Dropout(LN(e + PE[pos] + T[type]))
    output_embeds: Tensor  #: Dropout(tanh(W · LN(Encoder(x))))
    cos_sim: Tensor        #: s_i = cos(e_i, o_i)


@dataclass
class KeepMask:
    """Keep decisions of one batch.

    ``keep`` is ``[B, L]`` in the dtype of the scores (float32): 1 = keep, 0 = mask, 0 at padding. In
    straight-through mode it carries the Gumbel-softmax gradient (forward value exactly 0/1).
    """

    keep: Tensor
    hist_keep_count: Tensor     #: [B] long: history tokens kept per sample (k_h; 0 if the sample has none)
    target_keep_count: Tensor   #: [B] long: target/reference tokens kept per sample
    hist_keep_prob: Optional[Tensor] = None    #: [B, L] q over 𝓗 (mutual only), 0 outside 𝓗
    target_keep_prob: Optional[Tensor] = None  #: [B, L] q over 𝓣 (mutual only), 0 outside 𝓣
    scores: Optional[MaskScores] = None        #: scorer outputs (mutual only)

    @property
    def hard(self) -> Tensor:
        """The hard decision as a bool tensor (no autograd graph)."""
        return self.keep.detach() != 0


# ----------------------------------------------------------------------------------------------------------
# the scorer
# ----------------------------------------------------------------------------------------------------------
class MutualMaskGenerator(nn.Module):
    """Pigeon's mutual mask generator (spec §2.1), with the upstream state-dict names.

    Parameters follow ``MutualMaskGenerator(emb_dim, num_heads, num_layers, drop_prob, eps)`` of the released
    code (MMG:26-40): ``emb_dim`` = LLM width (4096 for LaVIT-7B), one ``nn.TransformerEncoderLayer`` with
    PyTorch's defaults (FFN ``dim_feedforward`` = 2048 whatever the width, dropout 0.1, ReLU, post-norm,
    batch-first), a type embedding with 3 rows (0 pad, 1 history, 2 target), **one** LayerNorm (``eps``)
    shared by input and output, ``dense`` + tanh head and Dropout(``drop_prob``).

    ``max_positions``: rows of the sinusoidal table (default 259, the released code has 257 — too few, see
    :data:`DEFAULT_POSITION_ROWS`). A 257-row checkpoint loads strictly (see :class:`PositionalEncoding`);
    :meth:`upstream_state_dict` writes one that the released code can load.

    ``forward`` = :meth:`score` + :func:`keep_probabilities` + :func:`gumbel_topk_keep` for both groups and
    returns a :class:`KeepMask`.
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
        """Run the scorer. ``token_embeds`` [B, L, D] (cast to the generator's dtype, spec §10.19),
        ``padding_mask`` [B, L] bool (True = padding), ``position_ids`` [B, L] (1..n per image, 0 at padding),
        ``type_ids`` [B, L] (1 history, 2 target, 0 padding).

        Padded positions cannot influence non-padded ones (they are excluded as attention keys and every other
        operation is per token); their ``output_embeds`` and ``cos_sim`` are set to 0.
        """
        if token_embeds.dim() != 3 or token_embeds.shape[-1] != self.emb_dim:
            raise ValueError(f"token_embeds must have shape (batch, length, {self.emb_dim}), got "
                             f"{tuple(token_embeds.shape)}")
        shape = token_embeds.shape[:2]
        _check_2d("type_ids", type_ids, shape)
        _check_2d("position_ids", position_ids, shape)
        _check_layout(type_ids, padding_mask)
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

        ``inference``: target keep probability ``p`` (True) or ``1 − p`` (False, training; spec §2.3).
        ``straight_through``: see the module docstring; ``False`` = reference behaviour (hard mask, and the
        scorer runs without autograd, so the generator gets no gradient).
        Noise: ``hist_exponential`` / ``target_exponential`` ([B, L] Exp(1) samples, only the group's positions
        are read) inject it; otherwise it is drawn from ``generator`` (or torch's default RNG), history first.
        """
        hist_mask_ratio = _check_ratio("hist_mask_ratio", hist_mask_ratio)
        ref_mask_ratio = _check_ratio("ref_mask_ratio", ref_mask_ratio)
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


# ----------------------------------------------------------------------------------------------------------
# keep probabilities and selection
# ----------------------------------------------------------------------------------------------------------
def keep_count(n: Tensor, mask_ratio: float) -> Tensor:
    """k = max(1, int(n · (1 − r))) per row (MMG:103), 0 where n = 0.

    ``1 − r`` is formed in Python float arithmetic and the product in float64 (IEEE double, like Python's
    float), then truncated: identical to Python's ``int(n * (1 - r))`` for every n < 2**53.
    """
    r = _check_ratio("mask_ratio", mask_ratio)
    frac = 1.0 - r
    k = torch.floor(n.to(torch.float64) * frac).to(torch.long).clamp_min(1)
    return torch.where(n > 0, k, torch.zeros_like(k))


def random_mask_count(n: Tensor, mask_ratio: float) -> Tensor:
    """m = ceil(n · r) tokens to mask (LP:335, ``math.ceil`` of the Python float product)."""
    r = _check_ratio("ref_mask_ratio", mask_ratio)
    return torch.ceil(n.to(torch.float64) * r).to(torch.long)


def masked_softmax(score: Tensor, mask: Tensor) -> Tensor:
    """``exp(s)·m / Σ exp(s)·m`` over the last dim (MMG:120-125; no max-shift, s = cos ∈ [−1, 1]).

    Rows without any position in ``mask`` give zeros instead of 0/0.
    """
    num = torch.exp(score) * mask.to(score.dtype)
    den = num.sum(-1, keepdim=True)
    return num / den.clamp_min(torch.finfo(score.dtype).tiny)


def keep_probabilities(cos_sim: Tensor, type_ids: Tensor, *, inference: bool) -> tuple[Tensor, Tensor]:
    """q for history (softmax over 𝓗) and target (softmax over 𝓣 at inference, 1 − softmax in training).

    Both are 0 outside their group (the released code leaves 1 − 0 = 1 there for the training target; that
    value is never read).
    """
    hist = type_ids == HIST_TYPE
    target = type_ids == TARGET_TYPE
    hist_q = masked_softmax(cos_sim, hist)
    target_p = masked_softmax(cos_sim, target)
    target_q = target_p if inference else (1.0 - target_p) * target.to(target_p.dtype)
    return hist_q, target_q


def _rank_within_rows(key: Tensor) -> Tensor:
    """Rank (0 = largest) of each entry within its row; ties broken by lower index first."""
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(key.shape[-1], device=key.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def gumbel_topk_keep(keep_prob: Tensor, group_mask: Tensor, mask_ratio: float, *, tau: float = 1.0,
                     exponential: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                     straight_through: bool = True) -> tuple[Tensor, Tensor]:
    """Gumbel top-k keep decision within one group per row (MMG:93-118), vectorised.

    ``keep_prob`` q [B, L]; ``group_mask`` [B, L] bool (the group's positions); ``mask_ratio`` r ∈ [0, 1].
    Per row: k = :func:`keep_count` (n = group size); z_i = (log q_i − log e_i)/τ with e_i ~ Exp(1) (given as
    ``exponential`` or drawn from ``generator``); y_hard = 1 at the k largest z in the group;
    y_soft = softmax of z over the group.

    Returns ``(keep, k)``: ``keep`` [B, L] = ``y_hard + (y_soft − stopgrad(y_soft))`` in straight-through mode
    (forward value exactly 0/1, gradient of y_soft), or the detached ``y_hard`` otherwise; 0 outside the group.
    """
    tau = _check_tau(tau)
    _check_2d("group_mask", group_mask, keep_prob.shape)
    if group_mask.dtype != torch.bool:
        raise TypeError(f"group_mask must be a bool tensor, got dtype {group_mask.dtype}")
    if exponential is None:
        exponential = torch.empty(keep_prob.shape, dtype=keep_prob.dtype, device=keep_prob.device)
        exponential.exponential_(generator=generator)
    else:
        _check_2d("exponential", exponential, keep_prob.shape)
        exponential = exponential.to(device=keep_prob.device, dtype=keep_prob.dtype)
    n = group_mask.sum(-1)
    k = keep_count(n, mask_ratio)

    finfo = torch.finfo(keep_prob.dtype)
    # q = 0 (e.g. the single target token in training: 1 − 1) would give log 0 = −inf and a NaN softmax
    # upstream; clamping to the smallest normal number changes nothing for q > 0.
    logits = torch.log(keep_prob.clamp_min(finfo.tiny))
    gumbel = -torch.log(torch.where(group_mask, exponential, torch.ones_like(exponential)))
    z = (logits + gumbel.detach()) / tau

    # Hard top-k: rank by z inside the group (outside: −inf, below every finite group value).
    key = torch.where(group_mask, z.detach().nan_to_num(nan=finfo.min, posinf=finfo.max, neginf=finfo.min),
                      torch.full_like(z, -math.inf))
    hard = (_rank_within_rows(key) < k.unsqueeze(-1)) & group_mask
    y_hard = hard.to(keep_prob.dtype)
    if not straight_through:
        return y_hard.detach(), k

    # Soft relaxation over the group; rows with an empty group get a harmless uniform softmax, zeroed below.
    has_group = group_mask.any(-1, keepdim=True)
    z_soft = torch.where(group_mask, z, torch.where(has_group, torch.full_like(z, -math.inf), torch.zeros_like(z)))
    y_soft = torch.softmax(z_soft, dim=-1) * group_mask.to(z.dtype)
    return y_hard + (y_soft - y_soft.detach()), k


def random_reference_keep(type_ids: Tensor, padding_mask: Tensor, ref_mask_ratio: float, *,
                          generator: Optional[torch.Generator] = None) -> KeepMask:
    """``mask_type='random'`` (LP:324-363): history fully kept; ``ceil(n·α_r)`` reference tokens masked,
    chosen uniformly without replacement. Hard mask, no gradient."""
    _check_layout(type_ids, padding_mask)
    r = _check_ratio("ref_mask_ratio", ref_mask_ratio)
    hist = type_ids == HIST_TYPE
    target = type_ids == TARGET_TYPE
    n_t = target.sum(-1)
    m = random_mask_count(n_t, r)
    u = torch.rand(type_ids.shape, generator=generator, device=type_ids.device)
    key = torch.where(target, u, torch.full_like(u, -math.inf))
    masked = (_rank_within_rows(key) < m.unsqueeze(-1)) & target
    keep = (hist | (target & ~masked)).to(torch.float32)
    return KeepMask(keep=keep, hist_keep_count=hist.sum(-1), target_keep_count=n_t - m)


def generate_keep_mask(mask_type: str, *, type_ids: Tensor, padding_mask: Tensor, ref_mask_ratio: float = 0.0,
                       hist_mask_ratio: float = 0.2, mask_generator: Optional[MutualMaskGenerator] = None,
                       token_embeds: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                       inference: bool = True, straight_through: bool = True, tau: float = 1.0,
                       generator: Optional[torch.Generator] = None, hist_exponential: Optional[Tensor] = None,
                       target_exponential: Optional[Tensor] = None) -> KeepMask:
    """One entry point for the three mask types (spec §2, §2.9).

    * ``"mutual"``: needs ``mask_generator``, ``token_embeds`` and ``position_ids``; see
      :meth:`MutualMaskGenerator.forward`.
    * ``"random"``: :func:`random_reference_keep` (``hist_mask_ratio`` is not used, as upstream).
    * ``"none"``: every non-padded token kept.
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    if mask_type == "mutual":
        missing = [name for name, v in (("mask_generator", mask_generator), ("token_embeds", token_embeds),
                                        ("position_ids", position_ids)) if v is None]
        if missing:
            raise ValueError(f"mask_type='mutual' needs {', '.join(missing)}")
        return mask_generator(token_embeds, padding_mask, position_ids, type_ids, ref_mask_ratio=ref_mask_ratio,
                              hist_mask_ratio=hist_mask_ratio, inference=inference,
                              straight_through=straight_through, tau=tau, generator=generator,
                              hist_exponential=hist_exponential, target_exponential=target_exponential)
    if mask_type == "random":
        return random_reference_keep(type_ids, padding_mask, ref_mask_ratio, generator=generator)
    _check_layout(type_ids, padding_mask)
    _check_ratio("ref_mask_ratio", ref_mask_ratio)
    return KeepMask(keep=(~padding_mask).to(torch.float32), hist_keep_count=(type_ids == HIST_TYPE).sum(-1),
                    target_keep_count=(type_ids == TARGET_TYPE).sum(-1))


def apply_keep(embeds: Tensor, keep: Tensor) -> Tensor:
    """Multiply token embeddings [B, L, D] by keep decisions [B, L]: masked tokens become zero vectors
    (as LP:606-618), kept ones are unchanged, and in straight-through mode the product carries the
    gradient to the mask generator (the fix of spec §2.8)."""
    if embeds.dim() != 3 or keep.shape != embeds.shape[:2]:
        raise ValueError(f"keep must have shape {tuple(embeds.shape[:2])} (the first two dims of embeds "
                         f"{tuple(embeds.shape)}), got {tuple(keep.shape)}")
    return embeds * keep.unsqueeze(-1).to(embeds.dtype)


def layout_from_counts(counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Generator inputs from per-image token counts, vectorised (LP:374-408, 461-480).

    ``counts`` [B, I] long: tokens of each image of each sample, the last column being the target/reference
    (e.g. I = 6: five history images + target). Returns ``(position_ids, type_ids, padding_mask)``, each
    [B, L] with L = max total: positions 1..n restarting per image (0 at padding), types 1/2 (0 at padding),
    padding_mask True at the right padding.
    """
    if counts.dim() != 2 or counts.shape[1] < 1:
        raise ValueError(f"counts must have shape (batch, images) with at least one image, got {tuple(counts.shape)}")
    if counts.dtype.is_floating_point:
        raise TypeError(f"counts must be an integer tensor, got dtype {counts.dtype}")
    if bool((counts < 0).any()):
        raise ValueError(f"token counts must be >= 0, got {counts.min().item()}")
    counts = counts.to(torch.long)
    lengths = counts.sum(-1)
    L = int(lengths.max()) if counts.numel() else 0
    ends = counts.cumsum(-1)
    col = torch.arange(L, device=counts.device).expand(counts.shape[0], L).contiguous()
    image = torch.searchsorted(ends, col, right=True).clamp_max(counts.shape[1] - 1)
    starts = (ends - counts).gather(-1, image)
    padding = col >= lengths.unsqueeze(-1)
    position_ids = (col - starts + 1).masked_fill(padding, 0)
    type_ids = torch.where(image == counts.shape[1] - 1, TARGET_TYPE, HIST_TYPE).masked_fill(padding, PAD_TYPE)
    return position_ids, type_ids, padding
