"""From dataset samples to model batches, for training and for generation alike.

* :class:`ImageTokenCache` — the visual tokens of each image, tokenized in batches on first use. A stochastic
  tokenizer (LaVIT's, docs/algorithm.md §1.7) either re-tokenizes on every use (``cache=False``, as upstream does in
  training) or, with a ``seed``, tokenizes each image once from its own generator, so an image gets the same tokens
  whatever else is tokenized with it.
* :class:`PromptDataset` — the samples of one split with their encoded prompts (docs/algorithm.md §1.3–1.4).
* :class:`PigeonCollator` — items → :class:`~pigeon_utils.model.PigeonBatch`: training sequences ending in
  ``[IMG] target [/IMG]`` with labels, or inference prompts ending in ``[IMG]``.
* :class:`EpochSampler` — one permutation of the training samples per epoch.
* :func:`prompt_batch` — the batch of a list of samples at their split indices (what generation reads).

Every random draw is seeded per sample (:mod:`pigeon_utils.seeds`), so a sample's masks do not depend on the batch
it lands in.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from torch import Tensor

from pigeon_utils.model import PigeonBatch
from pigeon_utils.prompts import N_HISTORY, encode_prompt, segment_prompt
from pigeon_utils.seeds import epoch_seed, image_seed, sample_seed
from pigeon_utils.sequence import assemble, mask_layout

__all__ = ["accepts", "ImageTokenCache", "PromptDataset", "PigeonCollator", "EpochSampler", "prompt_batch", "encode_sample"]


def accepts(fn, name: str) -> bool:
    """Whether callable `fn` takes a parameter `name` (False when its signature cannot be read)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class ImageTokenCache:
    """Visual tokens (code ids, CPU) per image id of dataset `ds`, from ``tokenizer.tokenize``.

    ``cache=False`` tokenizes on every call. ``seed``: a tokenizer whose ``tokenize`` takes a ``generator`` (a
    stochastic one) tokenizes each image alone from the generator of :func:`~pigeon_utils.seeds.image_seed`; a
    deterministic tokenizer (the toy's) runs in batches either way.
    """

    def __init__(self, ds, tokenizer, *, cache: bool = True, seed: Optional[int] = None, batch_size: int = 64):
        self.ds, self.tokenizer, self.cache, self.batch_size = ds, tokenizer, bool(cache), int(batch_size)
        self.seed = None if seed is None else int(seed)
        self._seeded = self.seed is not None and accepts(tokenizer.tokenize, "generator")
        self._codes: dict[int, Tensor] = {}

    def _run(self, iids: Sequence[int]) -> list[Tensor]:
        out: list[Tensor] = []
        if self._seeded:
            for i in iids:  # one generator per image
                g = torch.Generator().manual_seed(image_seed(self.seed, i))
                out.append(self.tokenizer.tokenize([self.ds.load_image(i)], generator=g).codes[0].reshape(-1).long().cpu())
            return out
        for k in range(0, len(iids), self.batch_size):
            chunk = iids[k: k + self.batch_size]
            toks = self.tokenizer.tokenize([self.ds.load_image(i) for i in chunk])
            out.extend(c.reshape(-1).long().cpu() for c in toks.codes)
        return out

    def warm(self, iids: Sequence[int], progress: bool = False) -> None:
        """Tokenize every image of `iids` not yet cached (no-op without caching)."""
        if not self.cache:
            return
        todo = sorted({int(i) for i in iids} - set(self._codes))
        from tqdm.auto import tqdm

        for k in tqdm(range(0, len(todo), self.batch_size), desc="tokenizing images", disable=not progress or not todo):
            chunk = todo[k: k + self.batch_size]
            self._codes.update(zip(chunk, self._run(chunk)))

    def codes(self, iids: Sequence[int]) -> list[Tensor]:
        iids = [int(i) for i in iids]
        if not self.cache:
            return self._run(iids)
        self.warm(iids)
        return [self._codes[i] for i in iids]


def encode_sample(ds, sample, backbone) -> list[int]:
    """The instruction prompt of `sample`, encoded BOS-free with the placeholders spliced in by id."""
    return encode_prompt(segment_prompt(ds.prompt(sample)), backbone.encode_text, backbone.layout)


class PromptDataset(torch.utils.data.Dataset):
    """The samples of one split with their encoded prompts (encoded once). Items: ``{"index", "prompt_ids",
    "iids"}`` (five history iids, then the target)."""

    def __init__(self, ds, split: str, backbone, max_samples: Optional[int] = None):
        samples = ds.samples(split)
        if max_samples is not None:
            samples = samples[: int(max_samples)]
        if not samples:
            raise ValueError(f"split {split!r} of {ds.root} has no samples")
        self.samples = samples
        self.prompt_ids = [encode_sample(ds, s, backbone) for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "prompt_ids": self.prompt_ids[i], "iids": self.samples[i].iids}


class PigeonCollator:
    """Items → :class:`~pigeon_utils.model.PigeonBatch`.

    ``train=True``: the sequence ends in ``[IMG] target [/IMG]`` with labels; ``False``: in ``[IMG]`` (inference).
    The reference for the mask generator is the target image (docs/algorithm.md §1.6). Each sample's Exp(1) noise
    for the Gumbel top-k comes from :func:`~pigeon_utils.seeds.sample_seed` ``(seed, epoch, index)``; set
    :attr:`epoch` per epoch.
    """

    def __init__(self, tokens: ImageTokenCache, layout, seed: int, train: bool = True):
        self.tokens, self.layout, self.seed, self.train = tokens, layout, int(seed), bool(train)
        self.epoch = 0

    def __call__(self, items: list[dict]) -> PigeonBatch:
        iids = [i for it in items for i in it["iids"]]
        codes = self.tokens.codes(iids)
        off = self.layout.visual_offset
        per = N_HISTORY + 1
        history = [[codes[b * per + k] + off for k in range(N_HISTORY)] for b in range(len(items))]
        target = [codes[b * per + N_HISTORY] + off for b in range(len(items))]
        seq = assemble([it["prompt_ids"] for it in items], history, target if self.train else None, self.layout)
        masks = mask_layout(history, target, self.layout)
        lengths = (~masks.padding_mask).sum(1).tolist()
        noise = torch.ones(masks.ids.shape)
        for b, (it, n) in enumerate(zip(items, lengths)):  # one generator per sample (not per token)
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, it["index"]))
            noise[b, :n] = torch.empty(n).exponential_(generator=g)
        index = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return PigeonBatch(seq=seq, masks=masks, noise=noise, index=index)


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of the dataset per epoch, a pure function of ``(seed, epoch)`` (call :meth:`set_epoch`)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def prompt_batch(ds, samples: Sequence, indices: Sequence[int], backbone, tokens: ImageTokenCache, seed: int,
                 train: bool = False) -> PigeonBatch:
    """The batch of `samples`, whose split indices are `indices`: inference prompts ending in ``[IMG]`` (or, with
    ``train=True``, training sequences with labels). Each sample's mask noise comes from ``(seed, index)``, so its
    masks are the same in any batch and, at inference, its history mask is the same for every α_r."""
    items = [{"index": int(k), "iids": s.iids, "prompt_ids": encode_sample(ds, s, backbone)}
             for k, s in zip(indices, samples)]
    return PigeonCollator(tokens, backbone.layout, seed, train=train)(items)
