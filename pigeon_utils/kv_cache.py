"""KV caches for generation: a prompt prefix shared by many rows, read once per sample, and room reserved for the
generated tokens (used by :mod:`pigeon_utils.generation`).

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
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["IMPLEMENTATION", "SharedPrefixCache", "moved_rows", "shared_prefix_attention", "use_shared_prefix",
           "reserve_room", "reorder_generated"]

#: the name under which the attention function is registered with transformers
IMPLEMENTATION = "pigeon_shared_prefix"


def moved_rows(parent: Tensor) -> tuple[Tensor, Tensor]:
    """``(moved, source)``: the rows that `parent` maps onto another row, and those rows — what a beam reorder
    copies (a row that keeps its own parent is left in place)."""
    moved = (parent != torch.arange(len(parent), device=parent.device)).nonzero().squeeze(1)
    return moved, parent[moved]


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
        self._kv: Optional[Tensor] = None  # own keys / values of every layer: [layers, 2, N, H_kv, room, d]
        self._len = [0] * len(self.prefix)  # own positions written, per layer
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
        if self._kv is None:
            self._kv = key_states.new_empty(len(self.prefix), 2, *key_states.shape[:2], max(self.capacity, m),
                                            key_states.shape[-1])
        elif n + m > self._kv.shape[-2]:  # out of room: double it
            x = self._kv
            self._kv = torch.cat([x, x.new_empty(*x.shape[:-2], max(m, x.shape[-2]), x.shape[-1])], -2)
        kv = self._kv[layer_idx]
        kv[0, :, :, n:n + m], kv[1, :, :, n:n + m] = key_states, value_states
        self._len[layer_idx] = n + m
        return kv[0, :, :, :n + m], kv[1, :, :, :n + m]

    # ----------------------------------------------------------------------------------------- row operations
    def batch_repeat_interleave(self, repeats: int) -> None:
        """Every row `repeats` times in place (beams): own buffers and owners; the prefix is not copied."""
        self._rows(lambda x, dim: x.repeat_interleave(repeats, dim))

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the rows `indices` (in order); samples left without rows leave the prefix."""
        self._rows(lambda x, dim: x.index_select(dim, indices))
        used = torch.unique_consecutive(self.owner)
        if len(used) < len(self.prefix_mask):
            self.prefix = [(k[used], v[used]) for k, v in self.prefix]
            self.prefix_mask = self.prefix_mask[used]
            self.owner = torch.searchsorted(used, self.owner)

    def reorder_generated(self, parent: Tensor, start: int) -> None:
        """Rows take the own keys / values of rows `parent` from absolute position `start` on (in place); exact when
        rows mapped onto each other agree before `start` — the beams of one (sample, α_r) share their prompt."""
        moved, src = moved_rows(parent)
        if len(moved) and self._kv is not None:  # every layer at once, the written positions only (not the room)
            s, n = start - self.prefix_length, min(self._len)
            self._kv[:, :, moved, :, s:n] = self._kv[:, :, src, :, s:n]

    def _rows(self, fn) -> None:
        self.owner = fn(self.owner, 0)
        if self._kv is not None:
            self._kv = fn(self._kv, 2)
        self._groups = None

    def groups(self) -> "_Groups":
        """How the rows fall into samples (computed once per row layout, shared by every layer)."""
        if self._groups is None:
            counts = torch.bincount(self.owner, minlength=len(self.prefix_mask))
            first = counts.cumsum(0) - counts
            slot = torch.arange(len(self.owner), device=self.owner.device) - first[self.owner]
            n_max = max(1, int(counts.max())) if len(self.owner) else 1
            bias = None
            if not bool(self.prefix_mask.all()):  # left padding: −inf on its scores
                dtype = self.prefix[0][0].dtype
                bias = torch.zeros(self.prefix_mask.shape, dtype=dtype, device=self.prefix_mask.device)
                bias = bias.masked_fill(~self.prefix_mask, float("-inf"))[:, None, None, :]
            self._groups = _Groups(self.owner, slot, n_max, bool((counts == n_max).all()), bias)
        return self._groups


@dataclass
class _Groups:
    """Rows grouped by sample: ``owner`` / ``slot`` [N] (a row's sample and its place among that sample's rows),
    ``n_max`` rows per group (padded), ``equal`` (every sample has ``n_max`` rows: views instead of scatters), the
    prefix padding as an additive ``bias`` [S, 1, 1, c] (None: no padding)."""

    owner: Tensor
    slot: Tensor
    n_max: int
    equal: bool
    bias: Optional[Tensor]

    def to_groups(self, x: Tensor, n_samples: int) -> Tensor:
        """Per-row [N, h, r, m] -> per-sample [S, h, n_max·r, m] (padding rows 0)."""
        n, h, r, m = x.shape
        if self.equal:
            return x.reshape(n_samples, self.n_max, h, r, m).transpose(1, 2).reshape(n_samples, h, self.n_max * r, m)
        z = x.new_zeros(n_samples, h, self.n_max, r, m)
        z[self.owner, :, self.slot] = x
        return z.view(n_samples, h, self.n_max * r, m)

    def from_groups(self, y: Tensor, r: int) -> Tensor:
        """Per-sample [S, h, n_max·r, m] -> per-row [N, h, r, m]."""
        s, h, _, m = y.shape
        y = y.view(s, h, self.n_max, r, m)
        if self.equal:
            return y.transpose(1, 2).reshape(s * self.n_max, h, r, m)
        return y[self.owner, :, self.slot]


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
    grp = shared_prefix.groups()
    n, h, q, d = query.shape
    hk, own, c, n_s = key.shape[1], key.shape[2], pk.shape[2], pk.shape[0]
    g = h // hk  # query heads per key / value head (grouped-query attention)
    scale = d ** -0.5 if scaling is None else scaling
    qo = (query * scale).reshape(n, hk, g * q, d)  # head j reads key / value head j // g
    s_own = torch.matmul(qo, key.transpose(-1, -2))  # [N, hk, g·q, own]
    s_pre = torch.matmul(grp.to_groups(qo, n_s), pk.transpose(-1, -2))  # one product per sample: [S, hk, ·, c]
    if grp.bias is not None:
        s_pre += grp.bias
    scores = torch.cat([grp.from_groups(s_pre, g * q), s_own], dim=-1).float()
    if q > 1:  # query i (own position own − q + i) sees own keys up to its position
        i = torch.arange(q, device=query.device).repeat(g)
        future = torch.arange(own, device=query.device)[None, :] > (own - q + i)[:, None]
        scores[..., c:] = scores[..., c:].masked_fill(future, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(p[..., c:], value)  # [N, hk, g·q, d]
    out += grp.from_groups(torch.matmul(grp.to_groups(p[..., :c], n_s), pv), g * q)
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


# ------------------------------------------------------------------------------------------------- transformers' cache
def reserve_room(cache, extra: int) -> None:
    """Give every layer of a transformers ≥ 5 ``DynamicCache`` room for `extra` more positions, so each generated
    token is written in place instead of copying the whole cache (``DynamicLayer.update`` concatenates, a copy of
    the whole cache at every step). Results are unchanged: the attention reads the same values. A transformers 4.x
    cache (key / value lists) is left as it is."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return
    from transformers.cache_utils import DynamicLayer

    reserved = reserved_layer_class()
    if not all(type(layer) in (DynamicLayer, reserved) and layer.is_initialized for layer in layers):
        return  # a cache type we do not know: keep its own update
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[i] = reserved.from_layer(layer, extra)


@functools.lru_cache(maxsize=None)
def reserved_layer_class():
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


def reorder_generated(cache, parent: Tensor, start: int) -> None:
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
