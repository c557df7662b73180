"""Conversions between LaVIT codebook codes and LLM token ids.

LaVIT's LLM vocabulary: 0..31999 text, 32000 image start, 32001 image end, 32002 + k = visual code k.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pigeon_utils.lavit.config import TokenIds


def codes_to_llm_ids(code_ids: Sequence[torch.Tensor], ids: TokenIds = TokenIds(),
                     add_special: bool = False) -> list[torch.Tensor]:
    """Per-image code ids -> per-image LLM ids (code + 32002), optionally wrapped as 32000 ... 32001.

    This is the ``tokenize_image(..., add_special=...)`` output of upstream LaVIT.
    """
    out = []
    for codes in code_ids:
        vis = codes.long() + ids.visual_offset
        if add_special:
            start = vis.new_full((1,), ids.image_start)
            end = vis.new_full((1,), ids.image_end)
            vis = torch.cat((start, vis, end))
        out.append(vis)
    return out


def llm_ids_to_codes(sequences: torch.Tensor | Sequence[torch.Tensor],
                     ids: TokenIds = TokenIds()) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM output rows -> detokenizer input ``(code_ids, token_nums)``.

    As upstream (``generate_image_embeds``): subtract the visual offset (32002) from every id and keep
    the values >= 0. This drops image start/end, padding and any text id. ``code_ids`` holds the codes
    of all rows concatenated in order; ``token_nums[b]`` is the number of codes of row ``b``.
    Accepts a [B, L] tensor or a list of 1-D tensors of different lengths.
    """
    if isinstance(sequences, torch.Tensor):
        if sequences.dim() != 2:
            raise ValueError(f"llm_ids_to_codes: expected a [B, L] tensor, got shape {tuple(sequences.shape)}")
        keep = sequences >= ids.visual_offset
        return sequences[keep].long() - ids.visual_offset, keep.sum(dim=1)
    rows = list(sequences)
    if not rows:
        raise ValueError("llm_ids_to_codes: got an empty list of sequences")
    codes = [r[r >= ids.visual_offset].long() - ids.visual_offset for r in rows]
    nums = torch.tensor([len(c) for c in codes], dtype=torch.long, device=rows[0].device)
    return torch.cat(codes), nums
