"""Prompt text and its tokenizer-independent segmentation (docs/algorithm.md §1.3–1.4)."""
from __future__ import annotations

import pytest

from pigeon_utils.prompts import (EMB_TOKEN, IMG_TOKEN, LAVIT_LAYOUT, MOVIE_TEMPLATE, STICKER_TEMPLATE,
                                  build_prompt_text, clean_title, encode_prompt, segment_prompt)

INSTR = ("Below is an instruction that describes a task, paired with an input that provides further context. "
         "Write a response that appropriately completes the request.")


def test_sticker_text_layout_is_exact():
    text = build_prompt_text("sticker", "Sadness", "a crying cat")
    expected = (INSTR + "\n" + STICKER_TEMPLATE.task_description + "\nInput: The user likes the following stickers: "
                + "\n<img>" * 5 + "\nThe target sticker info: a sticker with the emotion of Sadness. a crying cat <emb>"
                + "\nResponse: <img>")
    assert text == expected
    assert text.count(IMG_TOKEN) == 6 and text.count(EMB_TOKEN) == 1


def test_sticker_segmentation_strips_like_transformers_4_33():
    segs = segment_prompt(build_prompt_text("sticker", "Sadness", "a crying cat"))
    s0 = INSTR + "\n" + STICKER_TEMPLATE.task_description + "\nInput: The user likes the following stickers:"
    assert segs == [s0] + [IMG_TOKEN] * 5 + [
        "The target sticker info: a sticker with the emotion of Sadness. a crying cat", EMB_TOKEN, "Response:", IMG_TOKEN]


def test_movie_segmentation_and_title_regex():
    titles = ["Alien (1979)", "Heat (1995)", "Up  (2009) ", "Se7en", "M (1931)"]
    text = build_prompt_text("movie", "Star Wars: Episode VI - Return of the Jedi (1983)", "a space battle",
                             history_titles=titles)
    segs = segment_prompt(text)
    s0 = INSTR + "\n" + MOVIE_TEMPLATE.task_description + "\nInput: The user likes the following movies: \nAlien"
    assert segs == [s0, IMG_TOKEN, "Heat", IMG_TOKEN, "Up", IMG_TOKEN, "Se7en", IMG_TOKEN, "M", IMG_TOKEN,
                    "The target movie is titled 'Star Wars: Episode VI - Return of the Jedi'. a space battle",
                    EMB_TOKEN, "Response:", IMG_TOKEN]
    # without the 4.33.2 stripping the white space stays inside the segments
    raw = segment_prompt(text, strip_added_token_whitespace=False)
    assert raw[2] == "\nHeat " and raw[-2] == "\nResponse: "
    with pytest.raises(ValueError, match="5 history titles"):
        build_prompt_text("movie", "X", "y", history_titles=titles[:4])


@pytest.mark.parametrize("title,clean", [("Heat (1995)", "Heat"), ("Heat (1995) ", "Heat"),
                                         ("Toy Story 2 (1999)", "Toy Story 2"), ("Heat(1995)", "Heat(1995)"),
                                         ("1984 (1984)", "1984"), ("No year", "No year")])
def test_clean_title(title, clean):
    assert clean_title(title) == clean


def test_encode_prompt_splices_literal_ids_and_adds_no_bos():
    segs = segment_prompt(build_prompt_text("sticker", "Anger", "x"))
    seen = []

    def enc(s):
        seen.append(s)
        return [100 + len(seen)]

    ids = encode_prompt(segs, enc, LAVIT_LAYOUT)
    assert ids == [101, 32000, 32000, 32000, 32000, 32000, 102, 32001, 103, 32000]
    assert seen == [s for s in segs if s not in (IMG_TOKEN, EMB_TOKEN)]


def test_id_layout():
    assert LAVIT_LAYOUT.vocab_size == 32002 + 16384
    import torch
    ids = torch.tensor([2, 32000, 32001, 32002, 48385, 48386])
    assert LAVIT_LAYOUT.is_visual(ids).tolist() == [False, False, False, True, True, False]
    with pytest.raises(ValueError, match="scenario"):
        build_prompt_text("poster", "x", "y")
