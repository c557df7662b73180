"""Attention over a prompt prefix shared by many rows, read once per sample (used by the α_r sweep's generation).

In the sweep every sample's prompt up to the ``<emb>`` slot is the same for all its α_r and, with beam-sample, for all
their beams: 4 samples × 11 ratios × 4 beams = 176 rows over 4 distinct prefixes. A standard KV cache repeats the
prefix for every row, so each generated token reads (and each beam reorder or row selection copies) 44 copies of
the same keys and values. :class:`SharedPrefixCache` keeps the prefix once per sample (``[S, H, c, d]``, with its
padding mask) and each row's own keys / values (the suffix ``E Response: [IMG]`` and the generated tokens) in row
buffers with room reserved; :func:`shared_prefix_attention` computes exactly softmax over ``[prefix; own]`` —
the prefix scores as one matrix product per sample over all its rows' queries.

transformers' Llama calls ``cache.update(...)`` and then the attention function named by
``config._attn_implementation``, passing on the keyword arguments of the model's forward: :func:`use_shared_prefix`
registers :func:`shared_prefix_attention` with transformers' ``AttentionInterface`` and selects it while the
sampling loop runs, and the forward passes the cache as ``shared_prefix=``. Why not a library: transformers'
cache classes repeat the prefix per row and its attention functions take one key / value tensor per row.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

__all__ = ["IMPLEMENTATION", "SharedPrefixCache", "shared_prefix_attention", "use_shared_prefix"]

#: the name under which the attention function is registered with transformers
IMPLEMENTATION = "pigeon_shared_prefix"


class SharedPrefixCache:
    """KV cache of rows grouped by sample: one prefix per sample, own keys / values per row.

    ``prefix``: per layer ``(keys, values)`` of shape ``[S, H_kv, c, d]``; ``prefix_mask`` [S, c] (False = left
    padding); ``owner`` [N]: each row's sample, non-decreasing (rows are sample-major and every row operation keeps
    their order); ``capacity``: own positions to reserve per row (grown when exceeded).
    """

    def __init__(self, prefix: list[tuple[Tensor, Tensor]], prefix_mask: Tensor, owner: Tensor, capacity: int):
        if len(owner) and bool((owner[1:] < owner[:-1]).any()):
            raise ValueError("SharedPrefixCache: rows must be ordered by sample (owner non-decreasing)")
        self.prefix = list(prefix)
        self.prefix_mask = prefix_mask.to(torch.bool)
        self.owner = owner
        self.capacity = max(1, int(capacity))
        self._k: list[Optional[Tensor]] = [None] * len(self.prefix)
        self._v: list[Optional[Tensor]] = [None] * len(self.prefix)
        self._len = [0] * len(self.prefix)
        self._groups = None

    @classmethod
    def from_prefix(cls, cache, prefix_mask: Tensor, owner: Tensor, capacity: int) -> "SharedPrefixCache":
        """From a transformers ``DynamicCache`` holding the prefix of each sample (one row per sample)."""
        return cls([(layer.keys, layer.values) for layer in cache.layers], prefix_mask, owner, capacity)

    @property
    def prefix_length(self) -> int:
        return int(self.prefix_mask.shape[1])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix_length + self._len[layer_idx]

    # ----------------------------------------------------------------------------------------- what Llama calls
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        """Append the rows' new keys / values [N, H_kv, m, d]; returns the rows' own keys / values so far."""
        n, m = self._len[layer_idx], key_states.shape[-2]
        if self._k[layer_idx] is None:
            shape = (*key_states.shape[:2], max(self.capacity, m), key_states.shape[-1])
            self._k[layer_idx], self._v[layer_idx] = key_states.new_empty(shape), value_states.new_empty(shape)
        elif n + m > self._k[layer_idx].shape[-2]:  # out of room: double it
            grow = lambda x: torch.cat([x, x.new_empty(*x.shape[:2], max(m, x.shape[-2]), x.shape[-1])], -2)  # noqa
            self._k[layer_idx], self._v[layer_idx] = grow(self._k[layer_idx]), grow(self._v[layer_idx])
        self._k[layer_idx][:, :, n:n + m] = key_states
        self._v[layer_idx][:, :, n:n + m] = value_states
        self._len[layer_idx] = n + m
        return self._k[layer_idx][:, :, :n + m], self._v[layer_idx][:, :, :n + m]

    # ----------------------------------------------------------------------------------------- row operations
    def batch_repeat_interleave(self, repeats: int) -> None:
        """Every row `repeats` times in place (beams): own buffers and owners; the prefix is not copied."""
        self._rows(lambda x: x.repeat_interleave(repeats, 0))

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the rows `indices` (in order); samples left without rows leave the prefix."""
        self._rows(lambda x: x[indices])
        used = torch.unique_consecutive(self.owner)
        if len(used) < len(self.prefix_mask):
            self.prefix = [(k[used], v[used]) for k, v in self.prefix]
            self.prefix_mask = self.prefix_mask[used]
            self.owner = torch.searchsorted(used, self.owner)
            self._groups = None

    def reorder_generated(self, parent: Tensor, start: int) -> None:
        """Rows take the own keys / values of rows `parent` from absolute position `start` on (in place); exact when
        rows mapped onto each other agree before `start` — the beams of one (sample, α_r) share their prompt."""
        moved = (parent != torch.arange(len(parent), device=parent.device)).nonzero().squeeze(1)
        if len(moved) == 0:
            return
        src, s = parent[moved], start - self.prefix_length
        for x, n in zip(self._k + self._v, self._len + self._len):
            if x is not None:  # the written positions only, not the reserved room
                x[moved, :, s:n] = x[src, :, s:n]

    def _rows(self, fn) -> None:
        self.owner = fn(self.owner)
        self._k = [None if x is None else fn(x) for x in self._k]
        self._v = [None if x is None else fn(x) for x in self._v]
        self._groups = None

    def groups(self) -> tuple[Tensor, Tensor, int, Optional[Tensor]]:
        """``(owner, slot, n_max, pad)``: each row's sample and place among that sample's rows, the most rows of a
        sample, and each row's prefix padding [N, c] (None without padding); computed once per row layout, shared
        by every layer."""
        if self._groups is None:
            counts = torch.bincount(self.owner, minlength=len(self.prefix_mask))
            first = counts.cumsum(0) - counts
            slot = torch.arange(len(self.owner), device=self.owner.device) - first[self.owner]
            pad = ~self.prefix_mask[self.owner]
            self._groups = (self.owner, slot, max(1, int(counts.max())) if len(self.owner) else 1,
                            pad if bool(pad.any()) else None)
        return self._groups


def shared_prefix_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None,
                            dropout: float = 0.0, shared_prefix: Optional[SharedPrefixCache] = None, **kwargs):
    """transformers attention function: softmax over the sample's prefix and the row's own keys (causal among the
    new queries). `query` [N, H, q, d]; `key` / `value` [N, H_kv, L, d] = the rows' own keys / values (the last q of
    them are the queries'); returns ``(output [N, q, H, d], None)``. Without ``shared_prefix`` (a forward that is
    not the sweep's) it is transformers' SDPA attention."""
    if shared_prefix is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout:
        raise ValueError("shared-prefix attention is for inference: dropout must be 0")
    pk, pv = shared_prefix.prefix[module.layer_idx]
    owner, slot, n_max, pad = shared_prefix.groups()
    n, h, q, d = query.shape
    hk, own, c = key.shape[1], key.shape[2], pk.shape[2]
    g = h // hk  # query heads per key / value head (grouped-query attention)
    scale = d ** -0.5 if scaling is None else scaling
    qo = query.reshape(n, hk, g * q, d)  # head j reads key / value head j // g
    s_own = torch.matmul(qo, key.transpose(-1, -2))  # [N, hk, g·q, L]
    qp = query.new_zeros(len(pk), hk, n_max, g * q, d)  # the queries grouped by sample
    qp[owner, :, slot] = qo
    s_pre = torch.matmul(qp.view(len(pk), hk, n_max * g * q, d), pk.transpose(-1, -2))
    s_pre = s_pre.view(len(pk), hk, n_max, g * q, c)[owner, :, slot]  # [N, hk, g·q, c]
    scores = torch.cat([s_pre, s_own], dim=-1).float() * scale
    if pad is not None:  # left padding of the prefix
        scores[..., :c] = scores[..., :c].masked_fill(pad[:, None, None, :], float("-inf"))
    if q > 1:  # query i (own position own − q + i) sees own keys up to its position
        i = torch.arange(q, device=query.device).repeat(g)
        future = torch.arange(own, device=query.device)[None, :] > (own - q + i)[:, None]
        scores[..., c:] = scores[..., c:].masked_fill(future, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(p[..., c:], value)  # [N, hk, g·q, d]
    pp = p.new_zeros(len(pk), hk, n_max, g * q, c)
    pp[owner, :, slot] = p[..., :c]
    out_pre = torch.matmul(pp.view(len(pk), hk, n_max * g * q, c), pv).view(len(pk), hk, n_max, g * q, d)
    out = out + out_pre[owner, :, slot]
    return out.reshape(n, h, q, d).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def use_shared_prefix(lm):
    """Select :func:`shared_prefix_attention` for the forwards of `lm` (a transformers causal LM) inside the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, shared_prefix_attention)
    old = lm.config._attn_implementation
    lm.config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        lm.config._attn_implementation = old
