"""Keep decisions of Pigeon's mask generation (docs/algorithm.md §2.3-2.5, §2.9): which visual tokens stay.

The mutual mask generator (:mod:`pigeon_utils.masking`) scores every visual token of a sample; this module
turns scores into keep / mask decisions, and also provides the other two mask types and the layout helpers.

1. **Keep probabilities** (:func:`keep_probabilities`, docs/algorithm.md §2.3). A softmax of the scores ``s``
   within each group: 𝓗 (all history tokens of a sample, pooled over the five images) and 𝓣 (the
   target/reference tokens). History: ``q_i = p_i``. Target: ``q_i = p_i`` at inference and ``q_i = 1 − p_i``
   in training.
2. **Gumbel top-k** (:func:`gumbel_topk_keep`, docs/algorithm.md §2.4). Per sample and group, with
   ``n = |group|`` and mask ratio ``r`` (α_h = ``hist_mask_ratio`` for 𝓗, α_r = ``ref_mask_ratio`` for 𝓣),
   keep ``k = max(1, int(n · (1 − r)))`` tokens: the top-k of ``(log q_i + g_i) / τ`` with Gumbel noise
   ``g_i = −log(e_i)``, ``e_i ~ Exp(1)`` (sampling k tokens without replacement ∝ q).

Everything is vectorised over the batch: samples are right-padded to a common length ``L`` and a boolean
``padding_mask`` (True = padding, as in ``nn.TransformerEncoder``) marks the padding; ``type_ids`` holds
:data:`PAD_TYPE` / :data:`HIST_TYPE` / :data:`TARGET_TYPE` per position. There is no Python loop over samples
or tokens; the per-row top-k uses a sort and a rank comparison ``rank < k_row``.

Two modes (``straight_through``):

* ``True`` (default, the fix of docs/algorithm.md §2.8, see docs/deviations.md M2): the keep value is the
  straight-through estimator ``y_hard + (y_soft − stopgrad(y_soft))``. Its forward value is exactly the hard
  0/1 decision, but its gradient is that of the soft Gumbel-softmax, so when the model multiplies the token
  embeddings by the keep values the LLM loss reaches the generator's parameters.
* ``False`` (the reference behaviour): a hard 0/1 mask without any autograd graph. The released code only
  compares the decision with 0, so its generator never receives a gradient and stays at its initialisation.

Mask types (:func:`generate_keep_mask`, docs/algorithm.md §2.9): ``"mutual"`` (the generator), ``"random"``
(no history masking; ``ceil(n·α_r)`` uniformly random reference tokens masked) and ``"none"`` (keep
everything).

Layout helpers: :func:`layout_from_counts` builds ``position_ids`` / ``type_ids`` / ``padding_mask`` from the
per-image token counts of each sample; :func:`check_layout`, :func:`check_batch_shape` and
:func:`check_ratio` validate such inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = [
    "MASK_TYPES",
    "PAD_TYPE",
    "HIST_TYPE",
    "TARGET_TYPE",
    "check_ratio",
    "check_batch_shape",
    "check_layout",
    "MaskScores",
    "KeepMask",
    "keep_count",
    "random_mask_count",
    "masked_softmax",
    "keep_probabilities",
    "gumbel_topk_keep",
    "random_reference_keep",
    "generate_keep_mask",
    "layout_from_counts",
]

#: The mask types of :func:`generate_keep_mask` (docs/algorithm.md §2.9).
MASK_TYPES = ("mutual", "random", "none")
#: ``type_ids`` values: padding, history token, target/reference token.
PAD_TYPE, HIST_TYPE, TARGET_TYPE = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def check_ratio(name: str, value) -> float:
    """``value`` as a float in [0, 1] (a one-element tensor is read); ``TypeError`` / ``ValueError`` naming
    ``name`` otherwise (NaN included)."""
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


def check_batch_shape(name: str, t: Tensor, shape: torch.Size) -> None:
    """``t`` must be a tensor of exactly ``shape`` (batch, length); the error names ``name``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)} (batch, length), got {tuple(t.shape)}")


def check_layout(type_ids: Tensor, padding_mask: Tensor) -> None:
    """``type_ids`` [B, L] integer in {0, 1, 2} and ``padding_mask`` [B, L] bool, True exactly where
    ``type_ids == 0``."""
    if type_ids.dim() != 2:
        raise ValueError(f"type_ids must have shape (batch, length), got {tuple(type_ids.shape)}")
    check_batch_shape("padding_mask", padding_mask, type_ids.shape)
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
# output
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
# keep probabilities and selection
# ----------------------------------------------------------------------------------------------------------
def keep_count(n: Tensor, mask_ratio: float) -> Tensor:
    """k = max(1, int(n · (1 − r))) per row (MMG:103), 0 where n = 0.

    ``1 − r`` is formed in Python float arithmetic and the product in float64 (IEEE double, like Python's
    float), then truncated: identical to Python's ``int(n * (1 - r))`` for every n < 2**53.
    """
    r = check_ratio("mask_ratio", mask_ratio)
    frac = 1.0 - r
    k = torch.floor(n.to(torch.float64) * frac).to(torch.long).clamp_min(1)
    return torch.where(n > 0, k, torch.zeros_like(k))


def random_mask_count(n: Tensor, mask_ratio: float) -> Tensor:
    """m = ceil(n · r) tokens to mask (LP:335, ``math.ceil`` of the Python float product)."""
    r = check_ratio("ref_mask_ratio", mask_ratio)
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
    check_batch_shape("group_mask", group_mask, keep_prob.shape)
    if group_mask.dtype != torch.bool:
        raise TypeError(f"group_mask must be a bool tensor, got dtype {group_mask.dtype}")
    if exponential is None:
        exponential = torch.empty(keep_prob.shape, dtype=keep_prob.dtype, device=keep_prob.device)
        exponential.exponential_(generator=generator)
    else:
        check_batch_shape("exponential", exponential, keep_prob.shape)
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
                          generator: Optional[torch.Generator] = None,
                          exponential: Optional[Tensor] = None) -> KeepMask:
    """``mask_type='random'`` (LP:324-363): history fully kept; ``ceil(n·α_r)`` reference tokens masked,
    chosen uniformly without replacement. Hard mask, no gradient. ``exponential``: i.i.d. positive noise [B, L]
    (a batch's per-sample Exp(1) draws) whose smallest entries pick the masked tokens — a sample's mask then does not
    depend on its batch, and the masked sets are nested across α_r; None: uniform draws from `generator`."""
    check_layout(type_ids, padding_mask)
    r = check_ratio("ref_mask_ratio", ref_mask_ratio)
    hist = type_ids == HIST_TYPE
    target = type_ids == TARGET_TYPE
    n_t = target.sum(-1)
    m = random_mask_count(n_t, r)
    if exponential is not None:
        u = -exponential.to(type_ids.device, torch.float32)
    else:
        u = torch.rand(type_ids.shape, generator=generator, device=type_ids.device)
    key = torch.where(target, u, torch.full_like(u, -math.inf))
    masked = (_rank_within_rows(key) < m.unsqueeze(-1)) & target
    keep = (hist | (target & ~masked)).to(torch.float32)
    return KeepMask(keep=keep, hist_keep_count=hist.sum(-1), target_keep_count=n_t - m)


def generate_keep_mask(mask_type: str, *, type_ids: Tensor, padding_mask: Tensor, ref_mask_ratio: float = 0.0,
                       hist_mask_ratio: float = 0.2, mask_generator: Optional[nn.Module] = None,
                       token_embeds: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                       inference: bool = True, straight_through: bool = True, tau: float = 1.0,
                       generator: Optional[torch.Generator] = None, hist_exponential: Optional[Tensor] = None,
                       target_exponential: Optional[Tensor] = None) -> KeepMask:
    """One entry point for the three mask types (docs/algorithm.md §2, §2.9).

    * ``"mutual"``: needs ``mask_generator``, ``token_embeds`` and ``position_ids``; see
      :meth:`pigeon_utils.masking.MutualMaskGenerator.forward`.
    * ``"random"``: :func:`random_reference_keep` (``hist_mask_ratio`` is not used, as upstream; the masked tokens
      are those with the smallest ``target_exponential`` when it is given).
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
        return random_reference_keep(type_ids, padding_mask, ref_mask_ratio, generator=generator,
                                     exponential=target_exponential)
    check_layout(type_ids, padding_mask)
    check_ratio("ref_mask_ratio", ref_mask_ratio)
    return KeepMask(keep=(~padding_mask).to(torch.float32), hist_keep_count=(type_ids == HIST_TYPE).sum(-1),
                    target_keep_count=(type_ids == TARGET_TYPE).sum(-1))


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
