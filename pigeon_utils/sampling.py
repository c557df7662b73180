"""The per-step arithmetic of visual-token sampling, on plain tensors (no model): top-k / top-p filtering,
inverse-CDF draws from given uniforms, and the steps of transformers 4.33.2's ``beam_sample`` (what the reference
ran, docs/algorithm.md §5.2), vectorised over many samples. :mod:`pigeon_utils.generation` runs the loops.

The uniforms come from outside (one generator per (sample, α_r) row), so a row's draws do not depend on the batch
it is computed in.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["filter_logits", "sample_inverse_cdf", "draw_without_replacement", "nonzero_columns", "beam_candidates",
           "beam_process", "beam_done", "keep_best", "apply_processors", "tempered"]


def filter_logits(logits: Tensor, top_k: int, top_p: float, min_keep: int = 1) -> Tensor:
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


def sample_inverse_cdf(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: per row the first id whose cumulative probability exceeds ``u`` ∈ [0, 1)."""
    cdf = probs.cumsum(-1)
    v = (u * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, v, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def draw_without_replacement(probs: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """``u.shape[1]`` ids per row of `probs` [G, N], drawn without replacement by successive inverse-CDF draws with
    the uniforms `u` [G, m] (the distribution of ``torch.multinomial(probs, m, replacement=False)``). Returns
    ``(ids [G, m], valid [G, m])``; a draw is invalid when its row has no probability left."""
    p = probs.clone()
    ids, valid = [], []
    for j in range(u.shape[1]):  # 2·num_beams draws, each vectorised over the rows
        i = sample_inverse_cdf(p, u[:, j])
        valid.append(p.gather(1, i[:, None]).squeeze(1) > 0)
        p.scatter_(1, i[:, None], 0.0)
        ids.append(i)
    return torch.stack(ids, 1), torch.stack(valid, 1)


def nonzero_columns(probs: Tensor) -> tuple[Tensor, Tensor]:
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


def beam_candidates(flat: Tensor, u: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One beam-sample draw: `flat` [G, K·V] running scores over every (beam, id), `u` [G, 2K] uniforms ->
    candidates sorted by score, descending: ``(score, id, beam, valid)``, each [G, 2K] (invalid: score −inf).

    After top-k filtering at most K·top_k of the K·V entries are non-zero, so the draws run over those alone, in
    the same column order: the cumulative sums (accumulated in double on the CPU) and hence the drawn ids are the
    ones of the full rows; an invalid draw (no probability left) is column K·V − 1, as in the full rows."""
    p, col = nonzero_columns(torch.softmax(flat, dim=-1))
    j, valid = draw_without_replacement(p, u)
    idx = col.gather(1, j).masked_fill(~valid, flat.shape[1] - 1)
    score = flat.gather(1, idx).masked_fill(~valid, float("-inf"))
    score, order = score.sort(dim=1, descending=True, stable=True)
    idx, valid = idx.gather(1, order), valid.gather(1, order)
    return score, idx % vocab, torch.div(idx, vocab, rounding_mode="floor"), valid


def beam_process(score: Tensor, ids: Tensor, beam: Tensor, valid: Tensor, num_beams: int, eos_id: int):
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


def beam_done(hyp_scores: Tensor, best: Tensor, cur_len: int, length_penalty: float, next_scores: Tensor) -> Tensor:
    """transformers' ``BeamHypotheses.is_done`` (early_stopping=False), per sample: it holds `num_beams` hypotheses
    (`hyp_scores` [G, K], best first) and the worst beats the best candidate's score `best` [G] normalised by
    `cur_len`; or no beam is left alive (`next_scores` all −inf)."""
    full = torch.isfinite(hyp_scores).all(1)
    return (full & (hyp_scores[:, -1] >= best / float(cur_len) ** length_penalty)) | ~torch.isfinite(next_scores).any(1)


def keep_best(scores: Tensor, tokens: Tensor, lengths: Tensor, k: int):
    """Per row the `k` best of ``scores`` [G, M] (ties: the earlier one), with their tokens [G, M, L] / lengths."""
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return (scores.gather(1, order), tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[2])),
            lengths.gather(1, order))


def apply_processors(procs: list, ids: Tensor, scores: Tensor, step: int, min_new_tokens: int, eos: int) -> Tensor:
    """`scores` after the logits processors (which see the ids so far) and the ``min_new_tokens`` ban on the end."""
    for p in procs:
        scores = p(ids, scores)
    if step < min_new_tokens:
        scores[:, eos] = float("-inf")
    return scores


def tempered(scores: Tensor, temperature: float) -> Tensor:
    """`scores` / `temperature` (at temperature 1 the same tensor: dividing by 1 changes no bit)."""
    return scores if temperature == 1.0 else scores / temperature
