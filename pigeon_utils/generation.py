"""Generation of visual tokens (docs/algorithm.md §5.2), one path for every caller: the α_r sweep
(:mod:`pigeon_utils.sweep`), notebook 03's looks at the model and the preference candidates.

For each sample the LMM reads the inference prompt (docs/algorithm.md §1.5),

    [pad…] S0  H1 … H5 (α_h-masked)  S1  E  S2  [IMG]   → samples y1 y2 … [/IMG]

where ``E`` = Adapter(mean Detokenizer(reference tokens kept at ratio α_r)) is the only input that changes with α_r.
Several α_r are generated in one pass:

1. :meth:`~pigeon_utils.model.PigeonModel.sweep_embeddings` gives the shared embeddings (history masked at α_h with
   per-sample noise, so the history mask is the same for every α_r) and one ``E`` per α_r;
2. :func:`prefill` runs the LMM once over the shared prefix (everything before the ``<emb>`` slot) and keeps its
   KV cache once per sample (:class:`~pigeon_utils.kv_cache.SharedPrefixCache`: every row of a sample — its ratios,
   later their beams — attends to the one copy), then runs the short suffix (``E``, ``Response:``, ``[IMG]``) for
   all ``B × R`` rows (sample-major: row ``b·R + r``);
3. :func:`generate_tokens` samples the visual tokens (top-k 50, top-p 1, temperature 1, only visual ids and
   ``[/IMG]`` allowed, ``min_new_tokens`` / ``max_new_tokens``, ``[/IMG]`` ends an image) in our own loop over the
   cache, with room reserved for the generated tokens: plain sampling, or with ``num_beams=4`` the reference's
   beam-sample. Each (sample, α_r) row draws its uniforms from its own generator
   (:func:`~pigeon_utils.seeds.row_seed`), so its image does not depend on the batch it is generated in;
4. :func:`decode_images` turns the tokens into pixels in one pixel-decoder call, each sample's noise from its own
   generator.

Beam-sample follows transformers 4.33.2's ``beam_sample`` (what the reference ran): every step adds each beam's
processed log-probabilities to its running score, applies temperature and top-k (at least 2 kept) to these running
scores, draws ``2·num_beams`` candidates without replacement from their softmax over all beams × vocabulary, sorts
them by score; an ``[/IMG]`` among the first ``num_beams`` candidates closes a hypothesis (score / length, the
length counting the leading ``[IMG]``), the first ``num_beams`` other candidates continue. A sample stops when it
holds ``num_beams`` hypotheses none of its beams can beat, or at ``max_new_tokens`` (open beams then join the
hypotheses); the best hypothesis is the image (deviations I1, I2 in ``docs/deviations.md``).

Why our own loop rather than transformers' ``generate``: ``generate`` repeats the prompt cache for every row, draws
from torch's global RNG (so an image would depend on its batch) and offers no beam-sample in transformers ≥ 4.40.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from pigeon_utils.backbone import to_uint8
from pigeon_utils.batching import ImageTokenCache, accepts, prompt_batch
from pigeon_utils.kv_cache import SharedPrefixCache, reorder_generated, reserve_room, use_shared_prefix
from pigeon_utils.model import PigeonBatch, PigeonModel
from pigeon_utils.sampling import (apply_processors, beam_candidates, beam_done, beam_process, filter_logits,
                                   keep_best, sample_inverse_cdf, tempered)
from pigeon_utils.seeds import row_seed
from pigeon_utils.sequence import IGNORE_INDEX

__all__ = ["SamplingConfig", "VisualOnlyLogitsProcessor", "base_lm", "prefill", "generate_tokens", "decode_images",
           "generate_images"]


# ------------------------------------------------------------------------------------------------- config
@dataclass
class SamplingConfig:
    """Visual-token generation (docs/algorithm.md §5.2): top-k 50, top-p 1.0, temperature 1.0, 20…300 new tokens; the reference's
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
        """The world's settings (:data:`pigeon_utils.worlds.WORLDS`), with the `overrides` that are not None."""
        from pigeon_utils.worlds import world

        return cls(**{**world(preset).sampling, **{k: v for k, v in overrides.items() if v is not None}})


class VisualOnlyLogitsProcessor:
    """Generation keeps only visual ids and ``[/IMG]`` (the end of the image) possible.

    Upstream suppresses the text ids 3…31999 only and drops the other non-visual ids afterwards
    (docs/algorithm.md §5.2); allowing only what can be decoded is the same image with less waste.
    """

    def __init__(self, layout, vocab_size: int):
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[layout.visual_offset: layout.visual_offset + layout.codebook_size] = True
        allowed[layout.emb_id] = True
        self.allowed = allowed

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        allowed = self.allowed.to(scores.device)[: scores.shape[-1]]
        return scores.masked_fill(~allowed, float("-inf"))


# ------------------------------------------------------------------------------------------------- the LMM
def base_lm(model: PigeonModel):
    """The ``LlamaForCausalLM`` with LoRA injected in place (peft's base model)."""
    return model.lmm.get_base_model()


def _run_lm(lm, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache=None):
    """One cached forward of the LMM trunk; returns ``(last hidden state [N, D], cache)``.

    transformers ≥ 5 names the cache ``cache`` (argument and output), earlier versions ``past_key_values``. A
    :class:`~pigeon_utils.kv_cache.SharedPrefixCache` runs with the shared-prefix attention."""
    if isinstance(cache, SharedPrefixCache):  # only made for transformers ≥ 5 (prefill)
        with use_shared_prefix(lm):
            out = lm.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=True, cache=cache, shared_prefix=cache)
        return out.last_hidden_state[:, -1], cache
    kw = "cache" if accepts(lm.model.forward, "cache") else "past_key_values"
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
    (a :class:`~pigeon_utils.kv_cache.SharedPrefixCache`: every row of a sample — its ratios, later its
    beams — attends to the one copy; with transformers < 5 the prefix cache is repeated over the ratios instead);
    without it every row reads its whole prompt into its own cache (the reference for tests and benchmarks).
    """
    if bool((batch.seq.labels != IGNORE_INDEX).any()):
        raise ValueError("prefill needs inference prompts (assembled with target=None): this batch has labels")
    lm = base_lm(model)
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
        if accepts(lm.model.forward, "cache"):  # transformers ≥ 5: read the prefix once per sample
            owner = torch.arange(b, device=x.device).repeat_interleave(n_r)
            cache = SharedPrefixCache.from_prefix(cache, seq.attention_mask[:, :c], owner, t - c + reserve)
        elif n_r > 1:
            cache.batch_repeat_interleave(n_r)
    xs = rep(x[:, c:]).clone()  # the suffix of every (sample, α_r) row
    rows = torch.arange(b * n_r, device=x.device)
    xs[rows, rep(seq.emb_position) - c] = e.reshape(b * n_r, d)
    h, cache = _run_lm(lm, xs, am, pos[:, c:], cache)
    if reserve and not isinstance(cache, SharedPrefixCache):
        reserve_room(cache, reserve)
    return lm.lm_head(h).float(), cache, am, pos[:, -1] + 1


# ------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate_tokens(model: PigeonModel, batch: PigeonBatch, ref_mask_ratios: Sequence[float],
                    sampling: SamplingConfig | None = None, *, seed: int = 123,
                    hist_mask_ratio: Optional[float] = None, share_prefix: bool = True) -> list[list[Tensor]]:
    """Generate one image's visual tokens per (sample, α_r) (docs/algorithm.md §5.2); returns ``codes[b][r]`` (code ids, CPU).

    ``batch``: inference prompts with per-sample mask noise and ``index`` (the samples' indices in their split, used
    for the per-row generators ``row_seed(seed, index, α_r)``). An image ends at ``[/IMG]`` (not before
    ``min_new_tokens``) or after ``max_new_tokens``; a finished (sample, α_r) leaves the batch and the KV cache, and
    the loop ends when none is left. ``sampling.num_beams > 1``: beam-sample (module docstring), else plain sampling.
    """
    sampling = sampling or SamplingConfig()
    if batch.index is None:
        raise ValueError("generate_tokens needs batch.index (the samples' indices) to seed each row's sampling")
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


def _plain_sample(model: PigeonModel, prompt: Tensor, logits: Tensor, cache, am: Tensor, next_pos: Tensor,
                  u: Tensor, procs: list, sampling: SamplingConfig) -> list[Tensor]:
    """Plain sampling over the prefilled rows; returns the code ids per row. `prompt` [N, T] input ids, `u`
    [N, max_new_tokens, 1] uniforms (inverse-CDF draws)."""
    layout, lm = model.layout, base_lm(model)
    n, t = prompt.shape
    u = u[..., 0]
    ids = torch.full((n, t + sampling.max_new_tokens), layout.pad_id, dtype=torch.long, device=prompt.device)
    ids[:, :t] = prompt
    alive = torch.arange(n, device=prompt.device)  # rows still generating; finished rows leave the batch and cache
    for step in range(sampling.max_new_tokens):
        scores = apply_processors(procs, ids[alive, : t + step], logits, step, sampling.min_new_tokens, layout.emb_id)
        scores = filter_logits(tempered(scores, sampling.temperature), sampling.top_k, sampling.top_p)
        nxt = sample_inverse_cdf(torch.softmax(scores, dim=-1), u[alive, step])
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
    layout, lm = model.layout, base_lm(model)
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
        scores = apply_processors(procs, seq[:, : t + step], torch.log_softmax(logits, dim=-1), step, sampling.min_new_tokens, eos)
        running = tempered(scores.add_(beam_scores.reshape(-1, 1)), sampling.temperature)
        running = filter_logits(running, sampling.top_k, sampling.top_p, min_keep=2)
        cand_s, cand_i, cand_b, valid = beam_candidates(running.reshape(g, k * vocab), u[grp, step], vocab)
        finish, next_s, next_i, next_b = beam_process(cand_s, cand_i, cand_b, valid, k, eos)
        # finished hypotheses: the parent's tokens so far; length counts the leading [IMG] (4.33: input_ids)
        new_s = (cand_s[:, :k] / float(step + 1) ** sampling.length_penalty).masked_fill(~(finish & live[:, None]), inf)
        new_t = seq[(rows + cand_b[:, :k]).reshape(-1), t:].reshape(g, k, length)
        hyp_s[grp], hyp_t[grp], hyp_n[grp] = keep_best(
            torch.cat([hyp_s[grp], new_s], 1), torch.cat([hyp_t[grp], new_t], 1),
            torch.cat([hyp_n[grp], torch.full_like(hyp_n[grp], step)], 1), k)
        live = live & ~beam_done(hyp_s[grp], cand_s[:, 0], step + 1, sampling.length_penalty, next_s)
        parent = (rows + next_b).reshape(-1)  # always a beam of the same group
        seq[:, t: t + step] = seq[parent, t: t + step]
        seq[:, t + step] = next_i.reshape(-1)
        beam_scores = next_s.masked_fill(~live[:, None], 0.0)  # finished groups idle with finite scores
        if step + 1 == length:  # out of length: the open beams of unfinished groups join their hypotheses
            if bool(live.any()):
                sel = grp[live]
                s_open = (next_s[live] / float(length + 1) ** sampling.length_penalty)
                open_t = seq[:, t:].reshape(g, k, length)[live]
                hyp_s[sel], hyp_t[sel], hyp_n[sel] = keep_best(
                    torch.cat([hyp_s[sel], s_open], 1), torch.cat([hyp_t[sel], open_t], 1),
                    torch.cat([hyp_n[sel], torch.full_like(hyp_n[sel], length)], 1), k)
            break
        if not bool(live.any()):
            break
        reorder_generated(cache, parent, start)
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


# ------------------------------------------------------------------------------------------------- images
@torch.no_grad()
def decode_images(model: PigeonModel, codes: Sequence[Sequence[Tensor]], indices: Sequence[int], seed: int,
                  **kw) -> Tensor:
    """Decode ``codes[b][r]`` (the images of samples `indices`) in one pixel-decoder call; returns float images
    [B·R, 3, H, W], sample-major. Each sample's noise comes from its own generator, ``row_seed(seed, index)``,
    drawn as if its R images were decoded alone."""
    decoder = model.backbone.pixel_decoder
    noise = torch.cat([decoder.draw_noise(len(per), torch.Generator().manual_seed(row_seed(seed, int(k))))
                       for k, per in zip(indices, codes)])
    return model.decode([c for per in codes for c in per], noise=noise, **kw)


def generate_images(model: PigeonModel, ds, samples: Sequence, ref_mask_ratio: float,
                    sampling: SamplingConfig | None = None, *, indices: Optional[Sequence[int]] = None,
                    seed: int = 0, batch_size: int = 4, hist_mask_ratio: Optional[float] = None, decode: bool = True,
                    tokens: Optional[ImageTokenCache] = None, progress: bool = False, **decode_kw) -> dict:
    """One image per sample at α_r = `ref_mask_ratio`, through the same path as the sweep (:func:`generate_tokens`
    and :func:`decode_images`). `indices`: the samples' split indices, which seed their draws (default 0…N−1).

    Returns ``{"codes": [Tensor], "images": uint8 [N, H, W, 3] or None}``; deterministic given `seed`.
    """
    from tqdm.auto import tqdm

    sampling = sampling or SamplingConfig()
    indices = list(range(len(samples))) if indices is None else [int(k) for k in indices]
    if len(indices) != len(samples):
        raise ValueError(f"generate_images: {len(samples)} samples but {len(indices)} indices")
    model.eval()
    tokens = tokens or ImageTokenCache(ds, model.backbone.tokenizer, seed=seed)
    codes: list[Tensor] = []
    images = []
    for k in tqdm(range(0, len(samples), batch_size), desc=f"generate α_r={ref_mask_ratio}", disable=not progress):
        idx = indices[k: k + batch_size]
        batch = prompt_batch(ds, samples[k: k + batch_size], idx, model.backbone, tokens, seed).to(model.device)
        per = generate_tokens(model, batch, [ref_mask_ratio], sampling, seed=seed, hist_mask_ratio=hist_mask_ratio)
        codes.extend(c[0] for c in per)
        if decode:
            images.append(to_uint8(decode_images(model, per, idx, seed, **decode_kw)))
    return {"codes": codes, "images": np.concatenate(images) if decode else None}
