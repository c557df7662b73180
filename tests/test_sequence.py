"""Sequence assembly against a hand-written layout (docs/algorithm.md §1.5, §2.2): two samples of different lengths and token
counts, left padding, zero-embedding positions, the <emb> slot and the labels."""
from __future__ import annotations

import pytest
import torch

import pigeon_utils  # noqa: F401
from pigeon_utils.prompts import IdLayout
from pigeon_utils.sequence import (EMB, HIST, IGNORE_INDEX, IMG_END, IMG_START, PAD, TARGET, TEXT, assemble,
                                   mask_layout, reference_codes)

# text ids 3..9, <img>=[IMG]=10, <emb>=[/IMG]=11, visual id = 12 + code, pad 2
LAYOUT = IdLayout(img_id=10, emb_id=11, visual_offset=12, codebook_size=20, pad_id=2)
I, E, P = 10, 11, 2
T_, H, M, S, Y, Z, _ = TEXT, HIST, EMB, IMG_START, TARGET, IMG_END, PAD


def t(*xs):
    return torch.tensor(xs, dtype=torch.long)


PROMPTS = [
    [3, I, I, I, I, I, 4, E, 5, I],                 # sticker-like: images back to back
    [3, 6, I, 7, I, I, I, I, 4, 4, E, 5, I],        # movie-like: a title before some images
]
HISTORY = [
    [t(12, 13), t(14), t(15, 16, 17), t(18), t(19, 20)],
    [t(24), t(25), t(26), t(27), t(28)],
]
TARGETS = [t(21, 22, 23), t(29)]


def test_training_layout_two_samples():
    a = assemble(PROMPTS, HISTORY, TARGETS, LAYOUT)
    row0 = [3, 12, 13, 14, 15, 16, 17, 18, 19, 20, 4, E, 5, I, 21, 22, 23, E]
    row1 = [P, P, P, 3, 6, 24, 7, 25, 26, 27, 28, 4, 4, E, 5, I, 29, E]
    assert a.input_ids.tolist() == [row0, row1]
    assert a.token_type.tolist() == [
        [T_, H, H, H, H, H, H, H, H, H, T_, M, T_, S, Y, Y, Y, Z],
        [_, _, _, T_, T_, H, T_, H, H, H, H, T_, T_, M, T_, S, Y, Z],
    ]
    assert a.attention_mask.tolist() == [[1] * 18, [0] * 3 + [1] * 15]
    assert a.position_ids.tolist() == [list(range(18)), [0, 0, 0] + list(range(15))]
    ign = IGNORE_INDEX
    assert a.labels.tolist() == [[ign] * 14 + [21, 22, 23, E], [ign] * 16 + [29, E]]
    assert a.num_label_tokens == 6
    assert a.emb_position.tolist() == [11, 13]
    # E shares its id with [/IMG]: only the type tells them apart
    assert (a.input_ids[1] == E).nonzero().flatten().tolist() == [13, 17]
    # history positions point at the same token in the mask-generator row (H1..H5 concatenated)
    assert a.hist_index.tolist() == [
        [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8] + [-1] * 8,
        [-1, -1, -1, -1, -1, 0, -1, 1, 2, 3, 4] + [-1] * 7,
    ]


def test_inference_layout_ends_in_img_start():
    a = assemble(PROMPTS, HISTORY, None, LAYOUT)
    assert a.input_ids.tolist() == [[3, 12, 13, 14, 15, 16, 17, 18, 19, 20, 4, E, 5, I],
                                    [P, 3, 6, 24, 7, 25, 26, 27, 28, 4, 4, E, 5, I]]
    assert (a.token_type[:, -1] == IMG_START).all()
    assert (a.labels == IGNORE_INDEX).all()
    assert a.emb_position.tolist() == [11, 11]


def test_mask_layout_and_zero_embedding_positions():
    ml = mask_layout(HISTORY, TARGETS, LAYOUT)
    assert ml.counts.tolist() == [[2, 1, 3, 1, 2, 5], [1, 1, 1, 1, 1, 3]]
    assert ml.ids.tolist() == [[12, 13, 14, 15, 16, 17, 18, 19, 20, I, 21, 22, 23, E],
                               [24, 25, 26, 27, 28, I, 29, E] + [P] * 6]
    assert ml.type_ids.tolist() == [[1] * 9 + [2] * 5, [1] * 5 + [2] * 3 + [0] * 6]
    assert ml.position_ids.tolist() == [[1, 2, 1, 1, 2, 3, 1, 1, 2, 1, 2, 3, 4, 5],
                                        [1, 1, 1, 1, 1, 1, 2, 3] + [0] * 6]
    assert ml.reference_code_mask.nonzero().tolist() == [[0, 10], [0, 11], [0, 12], [1, 6]]

    a = assemble(PROMPTS, HISTORY, TARGETS, LAYOUT)
    keep = torch.ones(ml.ids.shape)
    keep[0, [1, 4]] = 0.0   # mask the 2nd token of H1 and the 2nd token of H3 of sample 0
    keep[1, 2] = 0.0        # mask H3 of sample 1
    keep[ml.padding_mask] = 0.0
    scale = a.keep_scale(keep)
    zero = (scale == 0).nonzero().tolist()
    assert zero == [[0, 2], [0, 5], [1, 8]]
    assert a.input_ids[0, 2] == 13 and a.input_ids[0, 5] == 16 and a.input_ids[1, 8] == 26
    assert (a.attention_mask[0, [2, 5]] == 1).all() and a.attention_mask[1, 8] == 1  # attention kept


def test_keep_scale_carries_the_gradient():
    ml = mask_layout(HISTORY, TARGETS, LAYOUT)
    a = assemble(PROMPTS, HISTORY, TARGETS, LAYOUT)
    keep = torch.ones(ml.ids.shape, requires_grad=True)
    a.keep_scale(keep).sum().backward()
    grad_pos = set(map(tuple, (keep.grad != 0).nonzero().tolist()))
    # exactly the history tokens of the mask layout receive a gradient
    assert grad_pos == set(map(tuple, (ml.type_ids == 1).nonzero().tolist()))


def test_reference_codes_compacted_and_weighted():
    ml = mask_layout(HISTORY, TARGETS, LAYOUT)
    keep = torch.zeros(ml.ids.shape, requires_grad=False)
    keep[0, [9, 11, 13]] = 1.0  # [IMG], code 22-12=10, [/IMG]: only one code survives
    keep[1, [5, 7]] = 1.0       # only the delimiters: no reference code left (alpha_r = 1 case)
    codes, mask, weights = reference_codes(ml, keep, LAYOUT)
    assert codes.tolist() == [[10], [0]]
    assert mask.tolist() == [[True], [False]]
    assert weights.tolist() == [[1.0], [0.0]]
    keep[0, 10] = 1.0
    codes, mask, _ = reference_codes(ml, keep, LAYOUT)
    assert codes.tolist() == [[9, 10], [0, 0]] and mask.tolist() == [[True, True], [False, False]]


@pytest.mark.parametrize("prompt, msg", [
    ([3, I, I, I, I, E, 5, I], "5 <img>"),
    ([3, I, I, I, I, I, 4, 5, I], "0 <emb>"),
    ([3, I, I, I, E, I, I, 5, I], "<emb> follows 3"),
])
def test_bad_prompts_are_named(prompt, msg):
    with pytest.raises(ValueError, match=msg):
        assemble([prompt], HISTORY[:1], TARGETS[:1], LAYOUT)


def test_wrong_number_of_history_images():
    with pytest.raises(ValueError, match="sample 0 has 4 images, expected 5"):
        assemble(PROMPTS[:1], [HISTORY[0][:4]], TARGETS[:1], LAYOUT)
