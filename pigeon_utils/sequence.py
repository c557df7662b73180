"""Assembly of Pigeon's LMM input sequences (docs/algorithm.md §1.5, §2.2) — vectorised over the batch.

One sample of Stage-1 training becomes (left-padded to the batch's longest row)::

    [pad…] S0  H1 H2 H3 H4 H5  S1  E  S2  [IMG] y1 … yn [/IMG]

* ``S0, S1, S2`` — the text ids of the instruction prompt (:func:`pigeon_utils.prompts.encode_prompt`), which
  holds six ``<img>`` placeholders (five history images and the response slot) and one ``<emb>``.
* ``Hk`` — the visual ids of history image k (``visual_offset + code``), inserted **without** ``[IMG]/[/IMG]``.
  Tokens that the mask generator drops (history mask ratio α_h) keep their id, position and attention value 1;
  their input embedding is multiplied by the keep value 0 (a zero vector, LP:606-618). :attr:`AssembledBatch.hist_index`
  says which mask-generator position each history token comes from, so :meth:`AssembledBatch.keep_scale` turns the
  generator's keep vector into a per-position factor.
* ``E`` — the ``<emb>`` slot: its input embedding is replaced by the adapter output computed from the masked
  reference (reference mask ratio α_r). It is located by token *type*, never by id, because ``<emb>`` and ``[/IMG]``
  share one id (docs/algorithm.md §8.4).
* ``[IMG] y1 … yn [/IMG]`` — the target image (teacher forcing). Labels are ``y1 … yn [/IMG]`` (unshifted, HF
  convention: the model predicts ``labels[t]`` from positions ``< t``); every other position is −100.
  At inference (no target) the response slot is a single ``[IMG]`` and generation starts there.

The mask generator sees a second, right-padded layout (:class:`MaskLayout`): per sample the history tokens
H1…H5 followed by the reference wrapped in ``[IMG] … [/IMG]``, positions restarting at 1 per image, types 1/2.

Both layouts are built without any Python loop over tokens: the prompt is expanded with ``repeat_interleave``
(each ``<img>`` placeholder expands into the tokens of its image) and image tokens are gathered from a padded
``[B, 6, N]`` table.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from pigeon_utils.keep import TARGET_TYPE, layout_from_counts
from pigeon_utils.prompts import N_HISTORY, IdLayout

__all__ = ["PAD", "TEXT", "HIST", "EMB", "IMG_START", "TARGET", "IMG_END", "TOKEN_TYPE_NAMES", "IGNORE_INDEX",
           "AssembledBatch", "MaskLayout", "assemble", "mask_layout", "reference_codes", "pad_id_lists"]

# token types of the LMM sequence
PAD, TEXT, HIST, EMB, IMG_START, TARGET, IMG_END = range(7)
TOKEN_TYPE_NAMES = ("pad", "text", "history", "emb", "[IMG]", "target", "[/IMG]")
IGNORE_INDEX = -100
N_IMAGES = N_HISTORY + 1  # five history images + the response slot


def _to(batch, device):
    return type(batch)(**{f.name: (getattr(batch, f.name).to(device) if isinstance(getattr(batch, f.name), Tensor)
                                   else getattr(batch, f.name)) for f in fields(batch)})


@dataclass
class AssembledBatch:
    """The LMM inputs of a batch, all ``[B, T]`` (T = longest row; rows are left-padded).

    ``input_ids``: real ids everywhere (pad id at padding; ``<emb>`` id at the E slot, whose embedding is
    replaced); ``attention_mask``: 1 except at padding (masked history tokens keep 1); ``position_ids``:
    ``cumsum(attention_mask) − 1`` (0 at padding), the same at training and generation; ``labels``: the target's
    visual ids and ``[/IMG]``, −100 elsewhere; ``token_type``: :data:`PAD`, :data:`TEXT`, :data:`HIST`,
    :data:`EMB`, :data:`IMG_START`, :data:`TARGET`, :data:`IMG_END`; ``hist_index``: for history positions the
    column of the same token in the :class:`MaskLayout` row, −1 elsewhere; ``emb_position`` [B]: the E slot.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    labels: Tensor
    token_type: Tensor
    hist_index: Tensor
    emb_position: Tensor

    def to(self, device) -> "AssembledBatch":
        return _to(self, device)

    @property
    def num_label_tokens(self) -> int:
        """Supervised tokens of the batch (n_b visual tokens + one ``[/IMG]`` per sample)."""
        return int((self.labels != IGNORE_INDEX).sum())

    def keep_scale(self, keep: Tensor) -> Tensor:
        """Per-position embedding factor [B, T]: the mask generator's keep value (``keep`` [B, L] in the
        :class:`MaskLayout`) at history positions — 0 for a masked token, 1 for a kept one, carrying the
        straight-through gradient — and 1 everywhere else."""
        if keep.dim() != 2 or keep.shape[0] != self.hist_index.shape[0]:
            raise ValueError(f"keep must have shape (batch={self.hist_index.shape[0]}, L), got {tuple(keep.shape)}")
        is_hist = self.hist_index >= 0
        gathered = keep.gather(1, self.hist_index.clamp_min(0))
        return torch.where(is_hist, gathered, torch.ones_like(gathered))


@dataclass
class MaskLayout:
    """The mask generator's input layout (docs/algorithm.md §2.2), all ``[B, L]``, right-padded.

    ``ids``: LMM ids of H1…H5 then ``[IMG] reference [/IMG]`` (pad id at padding); ``position_ids`` 1..n per image
    (0 at padding); ``type_ids`` 1 history / 2 reference / 0 pad; ``padding_mask`` True at padding;
    ``counts`` [B, 6]: tokens per image (the reference's count includes the two delimiters).
    """

    ids: Tensor
    position_ids: Tensor
    type_ids: Tensor
    padding_mask: Tensor
    counts: Tensor

    def to(self, device) -> "MaskLayout":
        return _to(self, device)

    @property
    def reference_code_mask(self) -> Tensor:
        """[B, L] bool: the reference's visual tokens (type 2 without the ``[IMG]``/``[/IMG]`` delimiters)."""
        n_ref = self.counts[:, -1:]
        return (self.type_ids == TARGET_TYPE) & (self.position_ids > 1) & (self.position_ids < n_ref)


def pad_id_lists(rows: Sequence[Sequence[int] | Tensor], pad_value: int) -> tuple[Tensor, Tensor]:
    """Right-pad id lists to ``(ids [B, N], lengths [B])``; N ≥ 1."""
    ts = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in rows]
    lengths = torch.tensor([len(t) for t in ts], dtype=torch.long)
    if len(ts) == 0:
        raise ValueError("pad_id_lists needs at least one row")
    ts = [t if len(t) else torch.full((1,), pad_value, dtype=torch.long) for t in ts]
    ids = pad_sequence(ts, batch_first=True, padding_value=pad_value)
    return ids, lengths


def _check_images(name: str, images, batch: int, per_sample: int | None) -> None:
    if len(images) != batch:
        raise ValueError(f"{name}: expected {batch} samples (one per prompt), got {len(images)}")
    if per_sample is not None:
        bad = [b for b, imgs in enumerate(images) if len(imgs) != per_sample]
        if bad:
            raise ValueError(f"{name}: sample {bad[0]} has {len(images[bad[0]])} images, expected {per_sample}")


def _image_table(history: Sequence[Sequence[Tensor]], response: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    """[B, 6, N] ids table (5 history images + response slot) and counts [B, 6]."""
    flat = [torch.as_tensor(t, dtype=torch.long).reshape(-1) for imgs, r in zip(history, response)
            for t in (*imgs, r)]
    ids, lengths = pad_id_lists(flat, pad_id)
    b = len(response)
    return ids.reshape(b, N_IMAGES, -1), lengths.reshape(b, N_IMAGES)


def assemble(prompt_ids: Sequence[Sequence[int] | Tensor], history: Sequence[Sequence[Tensor]],
             target: Sequence[Tensor] | None, layout: IdLayout) -> AssembledBatch:
    """Splice prompts, history images and (training) the target into left-padded LMM sequences (docs/algorithm.md §1.5).

    ``prompt_ids``: per sample the encoded prompt with six ``<img>`` ids (``layout.img_id``; the last one is the
    response slot) and one ``<emb>`` id (``layout.emb_id``). ``history``: per sample five LongTensors of history
    visual ids (LMM ids, ``visual_offset + code``). ``target``: per sample the target's visual ids (training;
    becomes ``[IMG] y [/IMG]`` with labels), or None (inference; the response slot is ``[IMG]`` alone).
    """
    b = len(prompt_ids)
    if b == 0:
        raise ValueError("assemble needs at least one sample")
    _check_images("history", history, b, N_HISTORY)
    if target is not None:
        _check_images("target", target, b, None)
    prompts, p_len = pad_id_lists(prompt_ids, layout.pad_id)
    p_valid = torch.arange(prompts.shape[1])[None] < p_len[:, None]
    is_img = (prompts == layout.img_id) & p_valid
    is_emb = (prompts == layout.emb_id) & p_valid
    n_img, n_emb = is_img.sum(1), is_emb.sum(1)
    if bool((n_img != N_IMAGES).any()) or bool((n_emb != 1).any()):
        k = int(((n_img != N_IMAGES) | (n_emb != 1)).nonzero()[0, 0])
        raise ValueError(f"prompt {k} has {int(n_img[k])} <img> (id {layout.img_id}) and {int(n_emb[k])} <emb> "
                         f"(id {layout.emb_id}) placeholders; expected {N_IMAGES} and 1")
    # the emb placeholder must come after the five history slots and before the response slot
    slot = is_img.long().cumsum(1) - 1  # index of each <img> placeholder (valid where is_img)
    emb_slot_rank = (is_img.long().cumsum(1) * is_emb).sum(1)  # <img> placeholders before <emb>
    if bool((emb_slot_rank != N_HISTORY).any()):
        k = int((emb_slot_rank != N_HISTORY).nonzero()[0, 0])
        raise ValueError(f"prompt {k}: <emb> follows {int(emb_slot_rank[k])} <img> placeholders; expected it after "
                         f"the {N_HISTORY} history images and before the response <img>")

    # the response slot: [IMG] y [/IMG] (training) or [IMG] (inference)
    img_start = torch.tensor([layout.img_id])
    if target is None:
        response = [img_start for _ in range(b)]
    else:
        img_end = torch.tensor([layout.emb_id])
        response = [torch.cat([img_start, torch.as_tensor(t, dtype=torch.long).reshape(-1), img_end])
                    for t in target]
    table, counts = _image_table(history, response, layout.pad_id)  # [B, 6, N], [B, 6]

    # expansion: each valid prompt token -> 1 position, each <img> -> its image's tokens
    j = slot.clamp(0, N_IMAGES - 1)
    expand = torch.where(is_img, counts.gather(1, j), torch.ones_like(prompts)) * p_valid
    row_len = expand.sum(1)
    T = int(row_len.max())
    flat_expand = expand.reshape(-1)
    src = torch.repeat_interleave(torch.arange(flat_expand.numel()), flat_expand)  # flat prompt index per token
    starts = flat_expand.cumsum(0) - flat_expand
    offset = torch.arange(src.numel()) - starts[src]  # position inside its expansion
    sb, si = src // prompts.shape[1], src % prompts.shape[1]
    from_img = is_img[sb, si]
    sj = j[sb, si]
    image_tok = table[sb, sj, offset.clamp_max(table.shape[2] - 1)]
    values = torch.where(from_img, image_tok, prompts[sb, si])

    # token types
    n_resp = counts[:, -1]
    in_resp = from_img & (sj == N_IMAGES - 1)
    ttype = torch.full_like(values, TEXT)
    ttype = torch.where(is_emb[sb, si], torch.full_like(ttype, EMB), ttype)
    ttype = torch.where(from_img & (sj < N_HISTORY), torch.full_like(ttype, HIST), ttype)
    ttype = torch.where(in_resp & (offset == 0), torch.full_like(ttype, IMG_START), ttype)
    if target is not None:
        last = offset == n_resp[sb] - 1
        ttype = torch.where(in_resp & (offset > 0) & ~last, torch.full_like(ttype, TARGET), ttype)
        ttype = torch.where(in_resp & (offset > 0) & last, torch.full_like(ttype, IMG_END), ttype)

    # index of a history token in the mask layout row: tokens of earlier history images + offset
    hist_start = counts[:, :N_HISTORY].cumsum(1) - counts[:, :N_HISTORY]  # [B, 5]
    hidx = torch.where(ttype == HIST, hist_start[sb, sj.clamp_max(N_HISTORY - 1)] + offset, torch.full_like(values, -1))

    # place into left-padded rows
    row_pos = torch.arange(src.numel()) - (row_len.cumsum(0) - row_len)[sb]
    col = (T - row_len)[sb] + row_pos
    input_ids = torch.full((b, T), layout.pad_id, dtype=torch.long)
    token_type = torch.full((b, T), PAD, dtype=torch.long)
    hist_index = torch.full((b, T), -1, dtype=torch.long)
    input_ids[sb, col] = values
    token_type[sb, col] = ttype
    hist_index[sb, col] = hidx
    attention_mask = (token_type != PAD).long()
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    supervised = (token_type == TARGET) | (token_type == IMG_END)
    labels = torch.where(supervised, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    emb_position = (token_type == EMB).long().argmax(1)
    return AssembledBatch(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          labels=labels, token_type=token_type, hist_index=hist_index, emb_position=emb_position)


def mask_layout(history: Sequence[Sequence[Tensor]], reference: Sequence[Tensor], layout: IdLayout) -> MaskLayout:
    """The mask generator's input (docs/algorithm.md §2.2): H1…H5 then ``[IMG] reference [/IMG]`` per sample, right-padded.

    ``history``: per sample five LongTensors of LMM visual ids; ``reference``: per sample the reference image's
    LMM visual ids (in Pigeon the reference is the sample's target image, docs/algorithm.md §1.6).
    """
    b = len(reference)
    if b == 0:
        raise ValueError("mask_layout needs at least one sample")
    _check_images("history", history, b, N_HISTORY)
    wrapped = [torch.cat([torch.tensor([layout.img_id]), torch.as_tensor(r, dtype=torch.long).reshape(-1),
                          torch.tensor([layout.emb_id])]) for r in reference]
    table, counts = _image_table(history, wrapped, layout.pad_id)  # [B, 6, N]
    position_ids, type_ids, padding_mask = layout_from_counts(counts)
    valid = torch.arange(table.shape[2])[None, None] < counts[..., None]
    ids = torch.full(type_ids.shape, layout.pad_id, dtype=torch.long)
    ids[~padding_mask] = table[valid]  # row-major order of both is (sample, image, token)
    return MaskLayout(ids=ids, position_ids=position_ids, type_ids=type_ids, padding_mask=padding_mask,
                      counts=counts)


def reference_codes(mlayout: MaskLayout, keep: Tensor, layout: IdLayout) -> tuple[Tensor, Tensor, Tensor]:
    """The kept reference codes for the detokenizer (docs/algorithm.md §2.6, §3.2), compacted to the left.

    Drops masked tokens and the two delimiters, keeps raster order, and returns ``(codes [B, K], mask [B, K] bool,
    weights [B, K])`` with K ≥ 1 the most kept in a row, ``codes`` = id − ``visual_offset`` (0 at padding) and
    ``weights`` the keep values (1 in forward, carrying the straight-through gradient). A row with no kept code
    (α_r = 1 may keep only a delimiter, docs/algorithm.md §8.7) has an all-False mask.
    """
    is_code = mlayout.reference_code_mask
    kept = is_code & (keep.detach() != 0)
    order = torch.sort((~kept).to(torch.int8), dim=1, stable=True).indices  # kept first, raster order kept
    k = max(1, int(kept.sum(1).max()))
    order = order[:, :k]
    mask = kept.gather(1, order)
    codes = (mlayout.ids.gather(1, order) - layout.visual_offset).masked_fill(~mask, 0)
    weights = keep.gather(1, order) * mask.to(keep.dtype)
    return codes, mask, weights
