"""Stage-2 data (docs/algorithm.md §4.2-4.3): preference pairs, their dataset, and the collator that puts a pair's
chosen and rejected responses into one batch.

A preference pair is one sample of a split (its split index: history, target) with two visual-token sequences the
Stage-1 model generated for it — *chosen* and *rejected*, as code ids, the way the α_r sweep records them
(``index.json`` → ``images`` → ``codes``) — and optionally the α_r it is trained at (``ref_mask_ratio``). The plain
form every producer can write: ``{"index": int, "chosen": [codes], "rejected": [codes]}`` (+ ``"ref_mask_ratio"``).

A batch of B pairs (:class:`DPOBatch`) has **one** input preparation per pair, shared by both responses (§4.3): the
prompt, the history, the reference (the sample's target, §1.6), α_r and the mask noise; its LMM rows are the B
chosen rows, then the B rejected rows, left-padded to one length. ``response_tokens`` says how a response fills the
response slot:

* ``"all"`` (ours): Stage 1's splice ``[IMG] y1 … yn [/IMG]``, scored exactly as Stage 1's labels (y1 … yn, ``[/IMG]``);
* ``"reference"`` (upstream, §8.11): no ``[IMG]``; ``y1`` sits in its place as an unscored input, and
  y2 … yn, ``[/IMG]`` are scored.

Every draw of a pair is a pure function of ``(seed, stream, pair position)``: α_r ~ U(0, 1) (unless the pair gives
one) and the Exp(1) mask noise, so a pair has the same inputs in every epoch, every evaluation, every batch it lands
in and every process. ``reference_inputs="redrawn"`` (upstream, §8.10) adds a second draw of α_r and noise for the
reference pass, redrawn per epoch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from pigeon_utils.batching import ImageTokenCache, encode_sample
from pigeon_utils.keep import check_ratio
from pigeon_utils.prompts import N_HISTORY
from pigeon_utils.seeds import derive_seed
from pigeon_utils.sequence import IMG_START, AssembledBatch, MaskLayout, assemble, mask_layout

__all__ = ["RESPONSE_TOKENS", "REFERENCE_INPUTS", "STREAMS", "DPOPair", "as_pairs", "pair_seed",
           "pair_ref_mask_ratio", "PairDataset", "DPOBatch", "PairCollator"]

#: how a response fills the response slot: ours (Stage 1's splice) / upstream's
RESPONSE_TOKENS = ("all", "reference")
#: which inputs the reference pass sees: the policy's / upstream's fresh α_r and masks
REFERENCE_INPUTS = ("same", "redrawn")
#: the random streams of the pair lists (training pairs and validation pairs draw apart)
STREAMS = {"train": 1, "valid": 2}


@dataclass(frozen=True)
class DPOPair:
    """One pair: the sample's split index, chosen and rejected code ids, and the α_r it is trained at (None:
    drawn, :func:`pair_ref_mask_ratio`)."""

    index: int
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    ref_mask_ratio: Optional[float] = None

    def to_dict(self) -> dict:
        d = {"index": self.index, "chosen": list(self.chosen), "rejected": list(self.rejected)}
        if self.ref_mask_ratio is not None:
            d["ref_mask_ratio"] = self.ref_mask_ratio
        return d


def _codes(value, where: str, codebook_size: int) -> tuple[int, ...]:
    t = torch.as_tensor(value).reshape(-1)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{where}: expected integer code ids, got dtype {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{where}: an empty token sequence (a response needs at least one visual code)")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= codebook_size:
        raise ValueError(f"{where}: code ids must lie in [0, {codebook_size}) (codes, not LMM ids), got "
                         f"{lo if lo < 0 else hi}")
    return tuple(t.tolist())


def as_pairs(pairs: Sequence[Mapping | DPOPair], n_samples: int, codebook_size: int,
             where: str = "pairs") -> list[DPOPair]:
    """Validate preference pairs given as dicts (see the module docstring) or :class:`DPOPair`; `n_samples`:
    the size of their split. An empty list, a missing key, an index outside the split, a code outside the codebook
    or a ratio outside [0, 1] is a ValueError naming the pair."""
    if pairs is None or len(pairs) == 0:
        raise ValueError(f"{where}: no preference pairs (expected a non-empty list of "
                         "{'index', 'chosen', 'rejected'} dicts)")
    out = []
    for k, p in enumerate(pairs):
        if isinstance(p, DPOPair):
            p = p.to_dict()
        if not isinstance(p, Mapping):
            raise TypeError(f"{where}[{k}]: expected a dict with 'index', 'chosen', 'rejected', got "
                            f"{type(p).__name__}")
        missing = sorted({"index", "chosen", "rejected"} - set(p))
        if missing:
            raise ValueError(f"{where}[{k}]: missing {missing}")
        index = p["index"]
        if isinstance(index, bool) or int(index) != index or not (0 <= int(index) < n_samples):
            raise ValueError(f"{where}[{k}]: index {index!r} is not a sample of the split (0 … {n_samples - 1})")
        ratio = p.get("ref_mask_ratio")
        out.append(DPOPair(
            index=int(index), chosen=_codes(p["chosen"], f"{where}[{k}].chosen", codebook_size),
            rejected=_codes(p["rejected"], f"{where}[{k}].rejected", codebook_size),
            ref_mask_ratio=None if ratio is None else check_ratio(f"{where}[{k}].ref_mask_ratio", ratio)))
    return out


def pair_seed(seed: int, stream: str, position: int, draw: int = 0) -> int:
    """The seed of a pair's draws: `position` in its list, `stream` ``"train"`` / ``"valid"``, ``draw`` 0 = the
    policy's inputs, 1 + e = the reference pass's redrawn inputs in epoch e (``reference_inputs="redrawn"``)."""
    return derive_seed(derive_seed(seed, STREAMS[stream], draw), position)


def pair_ref_mask_ratio(seed: int, stream: str, position: int, draw: int = 0) -> float:
    """α_r ~ U(0, 1) of a pair (docs/algorithm.md §4.5), a pure function of its arguments."""
    return random.Random(pair_seed(seed, stream, position, draw)).random()


class PairDataset(torch.utils.data.Dataset):
    """The pairs of one split with their samples' encoded prompts (each sample encoded once). Items: ``{"pair"
    (position in the list), "index", "prompt_ids", "iids", "chosen", "rejected", "ref_mask_ratio"}``."""

    def __init__(self, ds, split: str, pairs: Sequence[Mapping | DPOPair], backbone,
                 max_pairs: Optional[int] = None):
        samples = ds.samples(split)
        self.pairs = as_pairs(pairs, len(samples), backbone.layout.codebook_size, where=f"{split} pairs")
        if max_pairs is not None:
            self.pairs = self.pairs[: int(max_pairs)]
        self.samples = {p.index: samples[p.index] for p in self.pairs}
        self.prompt_ids = {k: encode_sample(ds, s, backbone) for k, s in self.samples.items()}

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def iids(self) -> list[int]:
        return [i for s in self.samples.values() for i in s.iids]

    def __getitem__(self, i: int) -> dict:
        p = self.pairs[i]
        return {"pair": i, "index": p.index, "prompt_ids": self.prompt_ids[p.index],
                "iids": self.samples[p.index].iids, "chosen": p.chosen, "rejected": p.rejected,
                "ref_mask_ratio": p.ref_mask_ratio}


@dataclass
class DPOBatch:
    """B pairs: ``seq`` the LMM rows (S·B: the chosen rows, then the rejected rows — S = 2, or 1 for a batch of
    one side), ``masks`` the mask generator's layout [B, L] (shared by a pair's rows), ``noise`` [B, L] and
    ``ratio`` [B] (float64) the pair's mask noise and α_r, ``pair`` [B] the pairs' positions in their list,
    ``index`` [B] their samples' split indices; ``ref_noise`` / ``ref_ratio``: the reference pass's redrawn inputs
    (``reference_inputs="redrawn"``; None: the same as the policy's)."""

    seq: AssembledBatch
    masks: MaskLayout
    noise: Tensor
    ratio: Tensor
    pair: Tensor
    index: Tensor
    ref_noise: Optional[Tensor] = None
    ref_ratio: Optional[Tensor] = None

    def to(self, device, non_blocking: bool = False) -> "DPOBatch":
        def mv(t):
            return None if t is None else t.to(device)

        return DPOBatch(seq=self.seq.to(device), masks=self.masks.to(device), noise=mv(self.noise),
                        ratio=mv(self.ratio), pair=mv(self.pair), index=mv(self.index), ref_noise=mv(self.ref_noise),
                        ref_ratio=mv(self.ref_ratio))

    def __len__(self) -> int:
        return self.pair.shape[0]

    def inputs(self, reference: bool = False) -> tuple[Tensor, Tensor]:
        """``(ratio, noise)`` of the policy pass, or of the reference pass (its redrawn ones when there are)."""
        if reference and self.ref_ratio is not None:
            return self.ref_ratio, self.ref_noise
        return self.ratio, self.noise


class PairCollator:
    """Items of a :class:`PairDataset` → :class:`DPOBatch` (see the module docstring). ``stream``: ``"train"`` or
    ``"valid"``; ``sides``: the responses to put in the batch, in this order; :attr:`epoch` (set by the training
    loop) picks the reference pass's redraw."""

    def __init__(self, tokens: ImageTokenCache, layout, seed: int, stream: str, *, response_tokens: str = "all",
                 reference_inputs: str = "same", sides: Sequence[str] = ("chosen", "rejected")):
        if stream not in STREAMS:
            raise ValueError(f"stream={stream!r}: expected one of {tuple(STREAMS)}")
        if response_tokens not in RESPONSE_TOKENS:
            raise ValueError(f"response_tokens={response_tokens!r}: expected one of {RESPONSE_TOKENS}")
        if reference_inputs not in REFERENCE_INPUTS:
            raise ValueError(f"reference_inputs={reference_inputs!r}: expected one of {REFERENCE_INPUTS}")
        if not sides or set(sides) - {"chosen", "rejected"}:
            raise ValueError(f"sides={tuple(sides)!r}: expected 'chosen' and / or 'rejected'")
        self.tokens, self.layout, self.seed, self.stream = tokens, layout, int(seed), stream
        self.response_tokens, self.reference_inputs, self.sides = response_tokens, reference_inputs, tuple(sides)
        self.epoch = 0

    def _draws(self, items: list[dict], lengths: list[int], draw: int, shape) -> tuple[Tensor, Tensor]:
        noise = torch.ones(shape)
        ratio = torch.empty(len(items), dtype=torch.float64)
        for b, (it, n) in enumerate(zip(items, lengths)):  # one generator per pair (not per token)
            g = torch.Generator().manual_seed(pair_seed(self.seed, self.stream, it["pair"], draw))
            noise[b, :n] = torch.empty(n).exponential_(generator=g)
            given = it.get("ref_mask_ratio") if draw == 0 else None
            ratio[b] = given if given is not None else pair_ref_mask_ratio(self.seed, self.stream, it["pair"], draw)
        return noise, ratio

    def __call__(self, items: list[dict]) -> DPOBatch:
        per, off = N_HISTORY + 1, self.layout.visual_offset
        codes = self.tokens.codes([i for it in items for i in it["iids"]])
        history = [[codes[b * per + k] + off for k in range(N_HISTORY)] for b in range(len(items))]
        target = [codes[b * per + N_HISTORY] + off for b in range(len(items))]  # the reference (§1.6)
        responses = [torch.as_tensor(it[side], dtype=torch.long) + off for side in self.sides for it in items]
        prompts = [it["prompt_ids"] for _ in self.sides for it in items]
        if self.response_tokens == "all":
            seq = assemble(prompts, history * len(self.sides), responses, self.layout)
        else:  # upstream: y1 takes [IMG]'s place, unscored; y2 … yn [/IMG] scored
            seq = assemble(prompts, history * len(self.sides), [r[1:] for r in responses], self.layout)
            seq.input_ids[seq.token_type == IMG_START] = torch.stack([r[0] for r in responses])
        masks = mask_layout(history, target, self.layout)
        lengths = (~masks.padding_mask).sum(1).tolist()
        noise, ratio = self._draws(items, lengths, 0, masks.ids.shape)
        ref_noise = ref_ratio = None
        if self.reference_inputs == "redrawn":
            ref_noise, ref_ratio = self._draws(items, lengths, 1 + self.epoch, masks.ids.shape)
        return DPOBatch(seq=seq, masks=masks, noise=noise, ratio=ratio,
                        pair=torch.tensor([it["pair"] for it in items], dtype=torch.long),
                        index=torch.tensor([it["index"] for it in items], dtype=torch.long),
                        ref_noise=ref_noise, ref_ratio=ref_ratio)
