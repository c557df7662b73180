"""Inference of Pigeon (spec §5): personalized generation over a sweep of reference mask ratios α_r.

For each sample the LMM reads the inference prompt of spec §1.5,

    [pad…] S0  H1 … H5 (α_h-masked)  S1  E  S2  [IMG]   → samples y1 y2 … [/IMG]

where ``E`` = Adapter(mean Detokenizer(reference tokens kept at ratio α_r)) is the only input that changes with α_r.
The paper runs one full inference process per α_r ∈ {0.0, 0.1, …, 1.0} (spec §5.3). Here the sweep is one pass:

1. :meth:`~pigeon_utils.model.PigeonModel.sweep_embeddings` gives the shared embeddings (history masked at α_h with
   per-sample noise, so the history mask is the same for every α_r) and one ``E`` per α_r;
2. :func:`prefill` runs the LMM once over the shared prefix (everything before the ``<emb>`` slot) with the KV cache
   and keeps it once per sample (:class:`~pigeon_utils.prefix_attention.SharedPrefixCache`: every row of a sample —
   its ratios, later their beams — attends to the one copy), then runs the short suffix (``E``, ``Response:``,
   ``[IMG]``) for all ``B × R`` rows (sample-major: row ``b·R + r``);
3. :func:`sweep_tokens` generates the visual tokens (spec §5.2: top-k 50, top-p 1, temperature 1, only visual ids and
   ``[/IMG]`` allowed, ``min_new_tokens`` / ``max_new_tokens``, ``[/IMG]`` ends an image) with our own loop over the
   cache (with room reserved for the generated tokens, which are written in place rather than concatenated): plain
   sampling, or with ``num_beams=4`` the reference's beam-sample. Each (sample, α_r) draws its random
   numbers from its own generator, seeded by ``(seed, sample index, α_r)``, so a sample's image at a given α_r does
   not depend on the batch it is generated in (resume gives the same images);
4. :func:`run_sweep` decodes the tokens (detokenizer → pixel decoder: DDIM, guidance 7 with zero negative
   conditioning, 25 steps for LaVIT; the toy decoder's own defaults) in one call per LMM batch, each sample's noise
   from its own generator, writes ``<out_dir>/<α_r>/<index>_u<uid>_t<target>.png`` and records every finished
   image in ``<out_dir>/index.json``. Every file is written under a temporary name and renamed, the index is
   rewritten after each sample, and a re-run skips samples already in the index — an interrupted sweep resumes
   where it stopped. Batches are fixed (samples 0…B−1, B…2B−1, …), so a batch cut short is computed again with
   the same samples and its remaining images are those of an uninterrupted run to the last bit.

Beam-sample follows transformers 4.33.2's ``beam_sample`` (what the reference ran): every step adds each beam's
processed log-probabilities to its running score, applies temperature and top-k (at least 2 kept) to these running
scores, draws ``2·num_beams`` candidates without replacement from their softmax over all beams × vocabulary, sorts
them by score; an ``[/IMG]`` among the first ``num_beams`` candidates closes a hypothesis (score / length, the
length counting the leading ``[IMG]``), the first ``num_beams`` other candidates continue. A sample stops when it
holds ``num_beams`` hypotheses none of its beams can beat, or at ``max_new_tokens`` (open beams then join the
hypotheses); the best hypothesis is the image (deviations I1, I2 in ``docs/deviations.md``).
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from pigeon_utils.atomic import atomic_write
from pigeon_utils.model import PigeonBatch, PigeonModel, VisualOnlyLogitsProcessor
from pigeon_utils.prefix_attention import SharedPrefixCache, moved_rows, use_shared_prefix
from pigeon_utils.prompts import encode_prompt, segment_prompt
from pigeon_utils.sequence import IGNORE_INDEX
from pigeon_utils.sft import ImageTokenCache, SFTCollator

__all__ = ["PAPER_REF_MASK_RATIOS", "SamplingConfig", "InferenceConfig", "SweepResult", "ratio_key", "row_seed",
           "prefill", "sweep_tokens", "SeededImageTokens", "sweep_batch", "decode_sweep", "run_sweep", "load_index",
           "index_table", "load_image"]

#: α_r values of the paper's sweep (run_inf.sh)
PAPER_REF_MASK_RATIOS = tuple(round(0.1 * i, 1) for i in range(11))
INDEX_FILE = "index.json"
INDEX_VERSION = 1


# ------------------------------------------------------------------------------------------------- config
@dataclass
class SamplingConfig:
    """Visual-token generation (spec §5.2): top-k 50, top-p 1.0, temperature 1.0, 20…300 new tokens; the reference's
    beam-sample (``num_beams=4``, length penalty 1; the default) or plain sampling (``num_beams=1``).

    ``for_preset("toy")`` keeps the decoding settings and shortens the lengths (toy images have 5–25 tokens).
    """

    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 1.0
    min_new_tokens: int = 20
    max_new_tokens: int = 300
    num_beams: int = 4
    length_penalty: float = 1.0

    def __post_init__(self):
        if int(self.num_beams) != self.num_beams or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer (1 = plain sampling), got {self.num_beams!r}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        if int(self.max_new_tokens) != self.max_new_tokens or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (1 <= self.min_new_tokens <= self.max_new_tokens):
            raise ValueError(f"min_new_tokens must lie in [1, max_new_tokens={self.max_new_tokens}] (an image needs "
                             f"at least one visual token), got {self.min_new_tokens!r}")

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "SamplingConfig":
        if preset == "lavit":
            base: dict = {}
        elif preset == "toy":
            base = dict(min_new_tokens=1, max_new_tokens=40)
        else:
            raise ValueError(f"preset={preset!r}: expected 'toy' or 'lavit'")
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class InferenceConfig:
    """One α_r sweep: the ratios (α_r), α_h (None: the model's), samples per LMM batch (rows = ``batch_size`` ×
    number of ratios), the sampling settings, the pixel decoder's steps / guidance (None: the world's defaults —
    LaVIT: DDIM 25 steps, guidance 7) and the seed every random draw derives from."""

    ref_mask_ratios: tuple[float, ...] = PAPER_REF_MASK_RATIOS
    hist_mask_ratio: Optional[float] = None
    batch_size: int = 4
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    seed: int = 123

    def __post_init__(self):
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        self.ref_mask_ratios = tuple(float(r) for r in self.ref_mask_ratios)
        if not self.ref_mask_ratios:
            raise ValueError("ref_mask_ratios must hold at least one α_r")
        bad = [r for r in self.ref_mask_ratios if not (0.0 <= r <= 1.0)]
        if bad:
            raise ValueError(f"ref_mask_ratios must lie in [0, 1], got {bad}")
        keys = [ratio_key(r) for r in self.ref_mask_ratios]
        if len(set(keys)) != len(keys):
            raise ValueError(f"ref_mask_ratios has duplicates (to 2 decimals): {list(self.ref_mask_ratios)}")
        if self.hist_mask_ratio is not None and not (0.0 <= self.hist_mask_ratio <= 1.0):
            raise ValueError(f"hist_mask_ratio must be None or lie in [0, 1], got {self.hist_mask_ratio!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    @classmethod
    def for_preset(cls, preset: str, sampling: Optional[dict] = None, **overrides) -> "InferenceConfig":
        return cls(sampling=SamplingConfig.for_preset(preset, **(sampling or {})),
                   **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ref_mask_ratios"] = list(self.ref_mask_ratios)
        return d


def ratio_key(ratio: float) -> str:
    """The folder / index name of α_r: two decimals (``0.30``)."""
    return f"{float(ratio):.2f}"


def row_seed(seed: int, index: int, ratio: float | None = None) -> int:
    """The seed of one sample (``ratio=None``: its image tokenization and decoding noise) or of one
    (sample, α_r) row of the sampling loop — a pure function of its arguments."""
    r = -1 if ratio is None else int(round(float(ratio) * 1000))
    return (int(seed) * 1_000_003 + int(index) * 104_729 + (r + 2) * 7_919) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------- sampling
def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _lm(model: PigeonModel):
    """The ``LlamaForCausalLM`` with LoRA injected in place (peft's base model)."""
    return model.lmm.get_base_model()


def _run_lm(lm, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache=None):
    """One cached forward of the LMM trunk; returns ``(last hidden state [N, D], cache)``.

    transformers ≥ 5 names the cache ``cache`` (argument and output), earlier versions ``past_key_values``. A
    :class:`~pigeon_utils.prefix_attention.SharedPrefixCache` runs with the shared-prefix attention."""
    if isinstance(cache, SharedPrefixCache):  # only made for transformers ≥ 5 (prefill)
        with use_shared_prefix(lm):
            out = lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, cache=cache, shared_prefix=cache)
        return out.last_hidden_state[:, -1], cache
    kw = "cache" if _accepts(lm.model.forward, "cache") else "past_key_values"
    out = lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, **({kw: cache} if cache is not None else {}))
    return out.last_hidden_state[:, -1], getattr(out, kw)


@torch.no_grad()
def prefill(model: PigeonModel, batch: PigeonBatch, ref_mask_ratios: Sequence[float], *,
            hist_mask_ratio: Optional[float] = None, share_prefix: bool = True, reserve: int = 0):
    """Run the inference prompts of `batch` for every α_r of `ref_mask_ratios`; return ``(logits [B·R, V],
    cache, attention_mask [B·R, T], next_position [B·R])`` for the first generated token; the cache has room for
    `reserve` more positions per row.

    Rows are sample-major (row ``b·R + r`` = sample b at ``ref_mask_ratios[r]``). With ``share_prefix`` the LMM
    reads the columns before the earliest ``<emb>`` slot once per sample, and the cache keeps them once per sample
    (a :class:`~pigeon_utils.prefix_attention.SharedPrefixCache`: every row of a sample — its ratios, later its
    beams — attends to the one copy; with transformers < 5 the prefix cache is repeated over the ratios instead);
    without it every row reads its whole prompt into its own cache (the reference for tests and benchmarks).
    """
    if bool((batch.seq.labels != IGNORE_INDEX).any()):
        raise ValueError("prefill needs inference prompts (assembled with target=None): this batch has labels")
    lm = _lm(model)
    seq = batch.seq
    n_r = len(ref_mask_ratios)
    x, e, _ = model.sweep_embeddings(batch, ref_mask_ratios, hist_mask_ratio=hist_mask_ratio)
    b, t, d = x.shape
    rep = lambda v: v.repeat_interleave(n_r, dim=0)  # noqa: E731  [B, …] -> [B·R, …], sample-major
    am, pos = rep(seq.attention_mask), rep(seq.position_ids)
    c = int(seq.emb_position.min()) if share_prefix else 0
    cache = None
    if c > 0:
        _, cache = _run_lm(lm, x[:, :c], seq.attention_mask[:, :c], seq.position_ids[:, :c])
        if _accepts(lm.model.forward, "cache"):  # transformers ≥ 5: read the prefix once per sample
            owner = torch.arange(b, device=x.device).repeat_interleave(n_r)
            cache = SharedPrefixCache.from_prefix(cache, seq.attention_mask[:, :c], owner, t - c + reserve)
        elif n_r > 1:
            cache.batch_repeat_interleave(n_r)
    xs = rep(x[:, c:]).clone()  # the suffix of every (sample, α_r) row
    rows = torch.arange(b * n_r, device=x.device)
    xs[rows, rep(seq.emb_position) - c] = e.reshape(b * n_r, d)
    h, cache = _run_lm(lm, xs, am, pos[:, c:], cache)
    if reserve and not isinstance(cache, SharedPrefixCache):
        _reserve(cache, reserve)
    return lm.lm_head(h).float(), cache, am, pos[:, -1] + 1


def _reserve(cache, extra: int) -> None:
    """Give every layer of a transformers ≥ 5 ``DynamicCache`` room for `extra` more positions, so each generated
    token is written in place instead of copying the whole cache (``DynamicLayer.update`` concatenates: a toy
    beam-sample sweep's token stage took 11.1 s with that copy, 8.2 s without, README). Results are unchanged: the
    attention reads the same values. A transformers 4.x cache (key / value lists) is left as it is."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return
    from transformers.cache_utils import DynamicLayer

    reserved = _reserved_layer_class()
    if not all(type(layer) in (DynamicLayer, reserved) and layer.is_initialized for layer in layers):
        return  # a cache type we do not know: keep its own update
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[i] = reserved.from_layer(layer, extra)


@functools.lru_cache(maxsize=None)
def _reserved_layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys / values are views of larger buffers; `update` writes into the free room
        (and doubles it when full), row selection and repetition act on the buffers."""

        @classmethod
        def from_layer(cls, layer, extra: int):
            new = cls()
            new.device, new.is_initialized = layer.device, True
            n = layer.keys.shape[-2]
            new._k, new._v = (x.new_empty(*x.shape[:2], n + max(1, int(extra)), x.shape[-1])
                              for x in (layer.keys, layer.values))
            new._k[:, :, :n], new._v[:, :, :n] = layer.keys, layer.values
            new._view(n)
            return new

        def _view(self, n: int) -> None:
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if n + m > self._k.shape[-2]:  # out of room: double it
                room = max(m, self._k.shape[-2])
                self._k, self._v = (torch.cat([x, x.new_empty(*x.shape[:2], room, x.shape[-1])], -2)
                                    for x in (self._k, self._v))
            self._k[:, :, n:n + m], self._v[:, :, n:n + m] = key_states, value_states
            self._view(n + m)
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            n = self.keys.shape[-2]
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)
            self._view(n)

        def batch_select_indices(self, indices) -> None:
            n = self.keys.shape[-2]
            self._k, self._v = self._k[indices], self._v[indices]
            self._view(n)

        def reorder_cache(self, beam_idx) -> None:
            self.batch_select_indices(beam_idx)

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a reserved generation cache is not cropped")

    return ReservedLayer


def _filter_logits(logits: Tensor, top_k: int, top_p: float, min_keep: int = 1) -> Tensor:
    """Top-k, then top-p (nucleus) filtering of [N, V] logits (−inf outside); each keeps at least `min_keep` ids
    (transformers keeps 2 when beams are on)."""
    if top_k:
        k = max(int(top_k), min_keep)
        if k < logits.shape[-1]:
            kth = torch.topk(logits, k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        p = torch.softmax(srt, dim=-1)
        drop_sorted = p.cumsum(-1) - p >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop_sorted[:, :min_keep] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _sample(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: per row the first id whose cumulative probability exceeds ``u`` ∈ [0, 1)."""
    cdf = probs.cumsum(-1)
    v = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, v, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def _draw_without_replacement(probs: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``u.shape[1]`` ids per row of `probs` [G, N], drawn without replacement by successive inverse-CDF draws with
    the uniforms `u` [G, m] (the distribution of ``torch.multinomial(probs, m, replacement=False)``). Returns
    ``(ids [G, m], valid [G, m])``; a draw is invalid when its row has no probability left."""
    p = probs.clone()
    ids, valid = [], []
    for j in range(u.shape[1]):  # 2·num_beams draws, each vectorised over the rows
        i = _sample(p, u[:, j])
        valid.append(p.gather(1, i[:, None]).squeeze(1) > 0)
        p.scatter_(1, i[:, None], 0.0)
        ids.append(i)
    return torch.stack(ids, 1), torch.stack(valid, 1)


def _nonzero_columns(probs: Tensor) -> tuple[Tensor, Tensor]:
    """The non-zero entries of each row of `probs` [G, N] in column order, left-aligned and zero-padded to the
    longest row: ``(p [G, M], column [G, M])`` (padding: probability 0, column N − 1)."""
    r, c = (probs > 0).nonzero(as_tuple=True)  # row-major: each row's columns ascending
    count = torch.bincount(r, minlength=probs.shape[0])
    slot = torch.arange(len(r), device=probs.device) - (count.cumsum(0) - count)[r]
    m = max(1, int(count.max()))
    col = torch.full((probs.shape[0], m), probs.shape[1] - 1, dtype=torch.long, device=probs.device)
    p = probs.new_zeros(probs.shape[0], m)
    col[r, slot], p[r, slot] = c, probs[r, c]
    return p, col


def _beam_candidates(flat: Tensor, u: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One beam-sample draw: `flat` [G, K·V] running scores over every (beam, id), `u` [G, 2K] uniforms ->
    candidates sorted by score, descending: ``(score, id, beam, valid)``, each [G, 2K] (invalid: score −inf).

    After top-k filtering at most K·top_k of the K·V entries are non-zero, so the draws run over those alone, in
    the same column order: the cumulative sums (accumulated in double on the CPU) and hence the drawn ids are the
    ones of the full rows; an invalid draw (no probability left) is column K·V − 1, as in the full rows."""
    p, col = _nonzero_columns(torch.softmax(flat, dim=-1))
    j, valid = _draw_without_replacement(p, u)
    idx = col.gather(1, j).masked_fill(~valid, flat.shape[1] - 1)
    score = flat.gather(1, idx).masked_fill(~valid, float("-inf"))
    score, order = score.sort(dim=1, descending=True, stable=True)
    idx, valid = idx.gather(1, order), valid.gather(1, order)
    return score, idx % vocab, torch.div(idx, vocab, rounding_mode="floor"), valid


def _beam_process(score: Tensor, ids: Tensor, beam: Tensor, valid: Tensor, num_beams: int, eos_id: int):
    """transformers' ``BeamSearchScorer.process``, vectorised over samples: an end id among the first `num_beams`
    candidates finishes a hypothesis; the first `num_beams` other valid candidates become the next beams (missing
    ones are dead beams with score −inf). Returns ``(finish [G, K], next_score, next_id, next_beam [G, K])``."""
    k = num_beams
    rank = torch.arange(score.shape[1], device=score.device)
    is_end = ids == eos_id
    finish = (is_end & valid & (rank < k))[:, :k]
    cont = ~is_end & valid
    pos = cont.long().cumsum(1) - 1
    take = cont & (pos < k)
    cols = torch.where(take, pos, k + rank).argsort(dim=1, stable=True)[:, :k]
    next_score = score.gather(1, cols).masked_fill(~take.gather(1, cols), float("-inf"))
    return finish, next_score, ids.gather(1, cols), beam.gather(1, cols)


def _beam_done(hyp_scores: Tensor, best: Tensor, cur_len: int, length_penalty: float, next_scores: Tensor) -> Tensor:
    """transformers' ``BeamHypotheses.is_done`` (early_stopping=False), per sample: it holds `num_beams` hypotheses
    (`hyp_scores` [G, K], best first) and the worst beats the best candidate's score `best` [G] normalised by
    `cur_len`; or no beam is left alive (`next_scores` all −inf)."""
    full = torch.isfinite(hyp_scores).all(1)
    return (full & (hyp_scores[:, -1] >= best / float(cur_len) ** length_penalty)) | ~torch.isfinite(next_scores).any(1)


def _reorder_generated(cache, parent: Tensor, start: int) -> None:
    """Reorder the rows of a KV cache to `parent` from position `start` on (in place). Exact when rows that
    `parent` maps onto each other hold the same cache before `start` — the beams of one group share their
    prompt — and copies only the generated part instead of the whole cache."""
    if isinstance(cache, SharedPrefixCache):
        cache.reorder_generated(parent, start)
        return
    if hasattr(cache, "layers"):  # transformers 5: one layer object per layer; 4.x: key / value lists
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = list(zip(cache.key_cache, cache.value_cache))
    moved, src = moved_rows(parent)  # only rows that take another beam's tokens are copied (right side read first)
    if len(moved) == 0:
        return
    for keys, values in pairs:  # one per layer
        keys[moved, :, start:] = keys[src, :, start:]
        values[moved, :, start:] = values[src, :, start:]


def _keep_best(scores: Tensor, tokens: Tensor, lengths: Tensor, k: int):
    """Per row the `k` best of ``scores`` [G, M] (ties: the earlier one), with their tokens [G, M, L] / lengths."""
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return (scores.gather(1, order), tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[2])),
            lengths.gather(1, order))


@torch.no_grad()
def sweep_tokens(model: PigeonModel, batch: PigeonBatch, ref_mask_ratios: Sequence[float],
                 sampling: SamplingConfig | None = None, *, seed: int = 123, hist_mask_ratio: Optional[float] = None,
                 share_prefix: bool = True) -> list[list[Tensor]]:
    """Generate one image's visual tokens per (sample, α_r) (spec §5.2); returns ``codes[b][r]`` (code ids, CPU).

    ``batch``: inference prompts with per-sample mask noise and ``index`` (the samples' indices in their split, used
    for the per-row generators ``row_seed(seed, index, α_r)``). An image ends at ``[/IMG]`` (not before
    ``min_new_tokens``) or after ``max_new_tokens``; a finished (sample, α_r) leaves the batch and the KV cache, and
    the loop ends when none is left. ``sampling.num_beams > 1``: beam-sample (module docstring), else plain sampling.
    """
    sampling = sampling or SamplingConfig()
    if batch.index is None:
        raise ValueError("sweep_tokens needs batch.index (the samples' indices) to seed each row's sampling")
    model.eval()
    layout = model.layout
    n_r = len(ref_mask_ratios)
    # room for every generated token: written in place, not concatenated
    logits, cache, am, next_pos = prefill(model, batch, ref_mask_ratios, hist_mask_ratio=hist_mask_ratio,
                                          share_prefix=share_prefix, reserve=sampling.max_new_tokens)
    vocab, dev = logits.shape[1], logits.device
    # per-row uniforms, one generator per (sample, α_r): independent of the batch composition
    draws = 2 * sampling.num_beams if sampling.num_beams > 1 else 1
    u = torch.stack([torch.rand(sampling.max_new_tokens, draws, generator=torch.Generator().manual_seed(
        row_seed(seed, int(i), r))) for i in batch.index.tolist() for r in ref_mask_ratios]).to(dev)
    procs = [VisualOnlyLogitsProcessor(layout, vocab)]
    extra = model.backbone.visual_logits_processor()
    if extra is not None:
        procs.append(extra)
    decode = _beam_sample if sampling.num_beams > 1 else _plain_sample
    codes = decode(model, batch.seq.input_ids.to(dev).repeat_interleave(n_r, dim=0), logits, cache, am, next_pos, u,
                   procs, sampling)
    return [codes[k * n_r: (k + 1) * n_r] for k in range(len(codes) // n_r)]


def _processed(procs: list, ids: Tensor, scores: Tensor, step: int, sampling: SamplingConfig, eos: int) -> Tensor:
    """`scores` after the logits processors (which see the ids so far) and the ``min_new_tokens`` ban on the end."""
    for p in procs:
        scores = p(ids, scores)
    if step < sampling.min_new_tokens:
        scores[:, eos] = float("-inf")
    return scores


def _tempered(scores: Tensor, temperature: float) -> Tensor:
    """`scores` / `temperature` (at temperature 1 the same tensor: dividing by 1 changes no bit)."""
    return scores if temperature == 1.0 else scores / temperature


def _plain_sample(model: PigeonModel, prompt: Tensor, logits: Tensor, cache, am: Tensor, next_pos: Tensor, u: Tensor,
                  procs: list, sampling: SamplingConfig) -> list[Tensor]:
    """Plain sampling over the prefilled rows; returns the code ids per row. `prompt` [N, T] input ids, `u`
    [N, max_new_tokens, 1] uniforms (inverse-CDF draws)."""
    layout, lm = model.layout, _lm(model)
    n, t = prompt.shape
    u = u[..., 0]
    ids = torch.full((n, t + sampling.max_new_tokens), layout.pad_id, dtype=torch.long, device=prompt.device)
    ids[:, :t] = prompt
    alive = torch.arange(n, device=prompt.device)  # rows still generating; finished rows leave the batch and cache
    for step in range(sampling.max_new_tokens):
        scores = _processed(procs, ids[alive, : t + step], logits, step, sampling, layout.emb_id)
        scores = _filter_logits(_tempered(scores, sampling.temperature), sampling.top_k, sampling.top_p)
        nxt = _sample(torch.softmax(scores, dim=-1), u[alive, step])
        ids[alive, t + step] = nxt
        going = nxt != layout.emb_id
        if not bool(going.any()) or step + 1 == sampling.max_new_tokens:
            break
        if not bool(going.all()):
            keep = going.nonzero().squeeze(1)
            alive, nxt, am, next_pos = alive[keep], nxt[keep], am[keep], next_pos[keep]
            cache.batch_select_indices(keep)
        am = torch.cat([am, am.new_ones(len(alive), 1)], dim=1)
        h, cache = _run_lm(lm, model.token_embeddings(nxt.unsqueeze(1)), am, (next_pos + step).unsqueeze(1), cache)
        logits = lm.lm_head(h).float()
    new = ids[:, t:]
    ended = (new == layout.emb_id).long().cumsum(1) > 0
    visual = layout.is_visual(new) & ~ended
    return [(row[v] - layout.visual_offset).cpu() for row, v in zip(new, visual)]


def _beam_sample(model: PigeonModel, prompt: Tensor, logits: Tensor, cache, am: Tensor, next_pos: Tensor, u: Tensor,
                 procs: list, sampling: SamplingConfig) -> list[Tensor]:
    """Beam-sample over the prefilled rows (one per (sample, α_r) = *group*); returns the best hypothesis's code
    ids per group. `prompt` [G, T] input ids, `u` [G, max_new_tokens, 2K] uniforms; see the module docstring."""
    layout, lm = model.layout, _lm(model)
    k, length, eos = sampling.num_beams, sampling.max_new_tokens, layout.emb_id
    n_groups, vocab = logits.shape
    dev, inf = logits.device, float("-inf")
    # every group starts as k identical beams with running score 0 (transformers 4.33 beam_sample)
    logits = logits.repeat_interleave(k, dim=0)
    cache.batch_repeat_interleave(k)
    am, next_pos = am.repeat_interleave(k, dim=0), next_pos.repeat_interleave(k, dim=0)
    start = am.shape[1]  # cache positions before this are the prompt, the same for every beam of a group
    t = prompt.shape[1]
    seq = torch.full((n_groups * k, t + length), layout.pad_id, dtype=torch.long, device=dev)  # ids per beam
    seq[:, :t] = prompt.repeat_interleave(k, dim=0)
    grp = torch.arange(n_groups, device=dev)  # groups in the batch
    live = torch.ones(n_groups, dtype=torch.bool, device=dev)  # ... and still generating
    beam_scores = torch.zeros(n_groups, k, device=dev)
    hyp_s = torch.full((n_groups, k), inf, device=dev)  # finished hypotheses per group: score, tokens, length
    hyp_t = torch.full((n_groups, k, length), layout.pad_id, dtype=torch.long, device=dev)
    hyp_n = torch.zeros(n_groups, k, dtype=torch.long, device=dev)
    for step in range(length):
        g = len(grp)
        rows = torch.arange(g, device=dev)[:, None] * k
        scores = _processed(procs, seq[:, : t + step], torch.log_softmax(logits, dim=-1), step, sampling, eos)
        running = _tempered(scores.add_(beam_scores.reshape(-1, 1)), sampling.temperature)
        running = _filter_logits(running, sampling.top_k, sampling.top_p, min_keep=2)
        cand_s, cand_i, cand_b, valid = _beam_candidates(running.reshape(g, k * vocab), u[grp, step], vocab)
        finish, next_s, next_i, next_b = _beam_process(cand_s, cand_i, cand_b, valid, k, eos)
        # finished hypotheses: the parent's tokens so far; length counts the leading [IMG] (4.33: input_ids)
        new_s = (cand_s[:, :k] / float(step + 1) ** sampling.length_penalty).masked_fill(~(finish & live[:, None]), inf)
        new_t = seq[(rows + cand_b[:, :k]).reshape(-1), t:].reshape(g, k, length)
        hyp_s[grp], hyp_t[grp], hyp_n[grp] = _keep_best(
            torch.cat([hyp_s[grp], new_s], 1), torch.cat([hyp_t[grp], new_t], 1),
            torch.cat([hyp_n[grp], torch.full_like(hyp_n[grp], step)], 1), k)
        live = live & ~_beam_done(hyp_s[grp], cand_s[:, 0], step + 1, sampling.length_penalty, next_s)
        parent = (rows + next_b).reshape(-1)  # always a beam of the same group
        seq[:, t: t + step] = seq[parent, t: t + step]
        seq[:, t + step] = next_i.reshape(-1)
        beam_scores = next_s.masked_fill(~live[:, None], 0.0)  # finished groups idle with finite scores
        if step + 1 == length:  # out of length: the open beams of unfinished groups join their hypotheses
            if bool(live.any()):
                sel = grp[live]
                s_open = (next_s[live] / float(length + 1) ** sampling.length_penalty)
                open_t = seq[:, t:].reshape(g, k, length)[live]
                hyp_s[sel], hyp_t[sel], hyp_n[sel] = _keep_best(
                    torch.cat([hyp_s[sel], s_open], 1), torch.cat([hyp_t[sel], open_t], 1),
                    torch.cat([hyp_n[sel], torch.full_like(hyp_n[sel], length)], 1), k)
            break
        if not bool(live.any()):
            break
        _reorder_generated(cache, parent, start)
        if 4 * int((~live).sum()) >= g:  # drop finished groups once they are a quarter of the batch
            sel = (rows + torch.arange(k, device=dev))[live].reshape(-1)
            cache.batch_select_indices(sel)
            am, next_pos, seq, next_i = am[sel], next_pos[sel], seq[sel], next_i[live]
            grp, beam_scores, live = grp[live], beam_scores[live], live[live]
        am = torch.cat([am, am.new_ones(len(am), 1)], dim=1)
        h, cache = _run_lm(lm, model.token_embeddings(next_i.reshape(-1, 1)), am, (next_pos + step).unsqueeze(1),
                           cache)
        logits = lm.lm_head(h).float()
    best = hyp_s.argmax(1)
    out = []
    for gi in range(n_groups):  # one per group: cut its best hypothesis to its length
        toks = hyp_t[gi, best[gi], : hyp_n[gi, best[gi]]]
        out.append((toks[layout.is_visual(toks)] - layout.visual_offset).cpu())
    return out


# ------------------------------------------------------------------------------------------------- data
class SeededImageTokens(ImageTokenCache):
    """:class:`~pigeon_utils.sft.ImageTokenCache` whose stochastic tokenizations (LaVIT, spec §1.7) are seeded per
    image by ``(seed, iid)``, so an image gets the same tokens whatever else is tokenized with it. A deterministic
    tokenizer (the toy's) runs in batches as usual."""

    def __init__(self, ds, tokenizer, seed: int, batch_size: int = 64):
        super().__init__(ds, tokenizer.tokenize, cache=True, batch_size=batch_size)
        self.seed = int(seed)
        self._seeded = _accepts(tokenizer.tokenize, "generator")

    def _run(self, iids: Sequence[int]) -> list[Tensor]:
        if not self._seeded:
            return super()._run(iids)
        out = []
        for i in iids:  # one generator per image
            g = torch.Generator().manual_seed(row_seed(self.seed, 10_000_000 + int(i)))
            out.append(self.tokenize([self.ds.load_image(i)], generator=g).codes[0].reshape(-1).long().cpu())
        return out


def sweep_batch(ds, samples: Sequence, indices: Sequence[int], backbone, tokens: ImageTokenCache,
                seed: int) -> PigeonBatch:
    """Inference prompts (ending in ``[IMG]``) of `samples`, whose split indices are `indices`; each sample's mask
    noise comes from ``(seed, index)``, so its history mask (α_h) is the same in any batch and for every α_r."""
    items = [{"index": int(k), "iids": s.iids,
              "prompt_ids": encode_prompt(segment_prompt(ds.prompt(s)), backbone.encode_text, backbone.layout)}
             for k, s in zip(indices, samples)]
    return SFTCollator(tokens, backbone.layout, seed, train=False)(items)


# ------------------------------------------------------------------------------------------------- files
def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def _save_index(index: dict, folder: Path) -> None:
    data = json.dumps(index, indent=None, separators=(",", ":")).encode()
    atomic_write(folder / INDEX_FILE, lambda f: f.write(data))


def load_index(folder: Path | str) -> dict:
    """``<folder>/index.json`` of a sweep (see :func:`run_sweep`); a missing or damaged file names itself."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sweep index here (run_sweep writes it)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: damaged sweep index ({e})") from None
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {index.get('version')!r}, expected {INDEX_VERSION}")
    return index


def load_image(folder: Path | str, rel: str) -> np.ndarray:
    """A generated image of a sweep as uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(Path(folder) / rel) as im:
        return np.asarray(im.convert("RGB"))


def index_table(index: dict) -> tuple[list[int], list[str]]:
    """The finished samples (split indices, sorted) and the ratio keys of a sweep index."""
    ratios = [ratio_key(r) for r in index["config"]["ref_mask_ratios"]]
    return sorted(int(k) for k in index["samples"]), ratios


# ------------------------------------------------------------------------------------------------- sweep
@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the index (see there), its folder, samples generated now / found finished,
    and the seconds spent generating tokens and decoding images."""

    index: dict
    out_dir: Path
    generated: int
    skipped: int
    token_seconds: float
    decode_seconds: float


def _to_uint8(images: Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def decode_sweep(model: PigeonModel, codes: Sequence[Sequence[Tensor]], indices: Sequence[int], seed: int,
                 **kw) -> Tensor:
    """Decode the images of a sweep batch (``codes[b][r]``, samples `indices`) in one pixel-decoder call; returns
    float images [B·R, 3, H, W], sample-major. Each sample's noise comes from its own generator,
    ``row_seed(seed, index)``, drawn as if its R images were decoded alone."""
    decoder = model.backbone.pixel_decoder
    noise = torch.cat([decoder.draw_noise(len(per), torch.Generator().manual_seed(row_seed(seed, int(k))))
                       for k, per in zip(indices, codes)])
    return model.decode([c for per in codes for c in per], noise=noise, **kw)


def run_sweep(model: PigeonModel, ds, split: str, out_dir: Path | str, cfg: InferenceConfig, *,
              max_samples: Optional[int] = None, model_label: str = "", resume: bool = True,
              progress: bool = True, interrupt_after: Optional[int] = None) -> SweepResult:
    """Generate one image per (sample, α_r) for the first `max_samples` samples of `split` (spec §5).

    Files under `out_dir` (e.g. ``run_dir/inference/test``): ``<α_r>/<index>_u<uid>_t<target>.png`` and
    ``index.json`` = ``{"version", "split", "model", "config", "samples": {index: {"uid", "gid", "history",
    "target", "images": {α_r: {"path", "codes"}}}}}`` (paths relative to `out_dir`, codes = the generated code ids,
    which notebook 04 turns into preference pairs). A sample enters the index only when all its images are written.

    ``resume``: skip samples already in the index (the index's config must equal `cfg`, else a ValueError says what
    differs; a batch with some samples finished is computed again, only its unfinished samples written); False
    starts the index over. ``interrupt_after``: stop after this many samples of this call (what a
    killed run leaves behind; used by the tests).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.rglob(".*.tmp*"):  # temporary files of a run killed mid-write
        stale.unlink()
    conf = cfg.to_dict()
    index = {"version": INDEX_VERSION, "split": split, "model": model_label, "config": conf, "samples": {}}
    if resume and (out_dir / INDEX_FILE).is_file():
        old = load_index(out_dir)
        if old["config"] != conf or old["split"] != split:
            diff = sorted(k for k in set(conf) | set(old["config"]) if conf.get(k) != old["config"].get(k))
            raise ValueError(f"{out_dir / INDEX_FILE}: written with other settings (differs in {diff or ['split']}); "
                             f"use another folder or resume=False to start over")
        index["samples"] = old["samples"]
    samples = ds.samples(split)[:max_samples]
    todo = {k for k in range(len(samples)) if str(k) not in index["samples"]
            or not all((out_dir / im["path"]).is_file() for im in index["samples"][str(k)]["images"].values())}
    skipped = len(samples) - len(todo)
    # fixed batches (0…B−1, B…2B−1, …): a resumed sweep computes a batch with the same samples as an uninterrupted
    # one, so its tokens and pixels are the same to the last bit; a batch whose samples are all finished is skipped
    size = cfg.batch_size
    batches = [list(range(k0, min(k0 + size, len(samples)))) for k0 in range(0, len(samples), size)]
    batches = [chunk for chunk in batches if todo.intersection(chunk)]
    model.eval()
    backbone = model.backbone
    tokens = SeededImageTokens(ds, backbone.tokenizer, cfg.seed)
    ratios = cfg.ref_mask_ratios
    keys = [ratio_key(r) for r in ratios]
    dec_kw = {k: v for k, v in (("num_inference_steps", cfg.num_inference_steps),
                                ("guidance_scale", cfg.guidance_scale)) if v is not None}
    t_tok = t_dec = 0.0
    generated = 0
    bar = tqdm(total=len(todo), desc=f"α_r sweep ({split}, {len(ratios)} ratios)", disable=not progress)
    for chunk in batches:
        t0 = time.perf_counter()
        batch = sweep_batch(ds, [samples[k] for k in chunk], chunk, backbone, tokens, cfg.seed).to(model.device)
        codes = sweep_tokens(model, batch, ratios, cfg.sampling, seed=cfg.seed, hist_mask_ratio=cfg.hist_mask_ratio)
        t_tok += time.perf_counter() - t0
        t0 = time.perf_counter()
        images = _to_uint8(decode_sweep(model, codes, chunk, cfg.seed, **dec_kw))
        t_dec += time.perf_counter() - t0
        for j, (k, per_ratio) in enumerate(zip(chunk, codes)):
            if k not in todo:  # finished by an earlier run (its batch is computed again, not its files)
                continue
            s = samples[k]
            entry = {"uid": s.uid, "gid": s.gid, "history": list(s.history), "target": s.target, "images": {}}
            for key, c, img in zip(keys, per_ratio, images[j * len(ratios): (j + 1) * len(ratios)]):
                rel = f"{key}/{k:05d}_u{s.uid}_t{s.target}.png"
                _save_png(img, out_dir / rel)
                entry["images"][key] = {"path": rel, "codes": c.tolist()}
            index["samples"][str(k)] = entry
            _save_index(index, out_dir)
            generated += 1
            bar.update(1)
            if interrupt_after is not None and generated >= interrupt_after:
                bar.close()
                return SweepResult(index, out_dir, generated, skipped, t_tok, t_dec)
    bar.close()
    _save_index(index, out_dir)
    return SweepResult(index, out_dir, generated, skipped, t_tok, t_dec)
