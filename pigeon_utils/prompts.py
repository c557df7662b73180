"""Pigeon's instruction prompts and the text side of LaVIT's id layout (docs/algorithm.md §1.3–1.4).

The prompt text is built exactly as the reference data utilities build it (same strings, same layout). The
reference tokenized it with transformers 4.33.2, whose slow tokenizer strips the white space (``\\n`` included)
on both sides of every added token (``<img>``, ``<emb>``); later versions do not, and give other ids. To stay
independent of the tokenizer version we never pass the whole string to a tokenizer: :func:`segment_prompt`
splits it into text segments and placeholder tokens (with the 4.33.2 stripping by default), and
:func:`encode_prompt` encodes each text segment on its own and splices in the literal placeholder ids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

IMG_TOKEN = "<img>"  # image placeholder == LaVIT's image-start token [IMG]
EMB_TOKEN = "<emb>"  # reference-embedding placeholder == LaVIT's image-end token [/IMG]
SEP = "\n"
N_HISTORY = 5


@dataclass(frozen=True)
class IdLayout:
    """Where the special and visual ids sit in the LMM vocabulary.

    LaVIT: text ids first, then ``[IMG]`` (= ``<img>``), ``[/IMG]`` (= ``<emb>``), then visual id
    = ``visual_offset + code`` for ``code`` in ``[0, codebook_size)``. The pad id is ``</s>``.
    """

    img_id: int
    emb_id: int
    visual_offset: int
    codebook_size: int
    pad_id: int

    @property
    def vocab_size(self) -> int:
        return self.visual_offset + self.codebook_size

    def is_visual(self, ids):
        return (ids >= self.visual_offset) & (ids < self.vocab_size)


LAVIT_LAYOUT = IdLayout(img_id=32000, emb_id=32001, visual_offset=32002, codebook_size=16384, pad_id=2)


@dataclass(frozen=True)
class PromptTemplate:
    instruction: str
    task_description: str
    prompt_start: str
    history_start: str
    target_start: str
    prompt_end: str


_INSTRUCTION = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.")

STICKER_TEMPLATE = PromptTemplate(
    instruction=_INSTRUCTION,
    task_description=("Instruction: You are a helpful personalized assistant. You will be provided with a list of "
                      "stickers that the user likes to analyze the user's preference over stickers. Based on this "
                      "analysis, please design a personalized sticker that aligns with target sticker info and the "
                      "user's sticker tastes."),
    prompt_start="Input: ",
    history_start="The user likes the following stickers: ",
    target_start="The target sticker info: a sticker with the emotion of <emo>. ",
    prompt_end="Response: ",
)

MOVIE_TEMPLATE = PromptTemplate(
    instruction=_INSTRUCTION,
    task_description=("Instruction: You are a helpful personalized assistant. You will be provided with a list of "
                      "movies that the user likes, along with the movie posters, to analyze the user's preference "
                      "over posters. Based on this analysis, please design a personalized poster that aligns with "
                      "target movie and the user's poster tastes."),
    prompt_start="Input: ",
    history_start="The user likes the following movies: ",
    target_start="The target movie is titled '<title>'. ",
    prompt_end="Response: ",
)

TEMPLATES = {"sticker": STICKER_TEMPLATE, "movie": MOVIE_TEMPLATE}
_TITLE_YEAR = re.compile(r"^(.*) \(\d+\) *$")
_PLACEHOLDERS = re.compile(f"({re.escape(IMG_TOKEN)}|{re.escape(EMB_TOKEN)})")


def clean_title(title: str) -> str:
    """Drop a trailing `` (YYYY)`` from a movie title, with the reference regex ``^(.*) \\(\\d+\\) *$``."""
    m = _TITLE_YEAR.match(title)
    return m.group(1) if m else title


def build_prompt_text(scenario: str, target_info: str, target_semantics: str,
                      history_titles: Sequence[str] | None = None) -> str:
    """The full prompt string of one sample, laid out as the reference does.

    `target_info` is the target sticker's emotion (sticker) or the target movie's title (movie; the year is
    removed here). `history_titles` (movie only) are the five history movies' titles.
    """
    if scenario not in TEMPLATES:
        raise ValueError(f"scenario={scenario!r}: expected one of {sorted(TEMPLATES)}")
    t = TEMPLATES[scenario]
    if scenario == "sticker":
        history = t.history_start + "".join(SEP + IMG_TOKEN for _ in range(N_HISTORY))
        target = t.target_start.replace("<emo>", target_info)
    else:
        if history_titles is None or len(history_titles) != N_HISTORY:
            n = None if history_titles is None else len(history_titles)
            raise ValueError(f"movie prompts need {N_HISTORY} history titles, got {n}")
        history = t.history_start + "".join(SEP + clean_title(x) + " " + IMG_TOKEN for x in history_titles)
        target = t.target_start.replace("<title>", clean_title(target_info))
    target = target + target_semantics + " " + EMB_TOKEN
    return (t.instruction + SEP + t.task_description + SEP + t.prompt_start + history + SEP + target + SEP
            + t.prompt_end + IMG_TOKEN)


def segment_prompt(text: str, strip_added_token_whitespace: bool = True) -> list[str]:
    """Split a prompt into text segments and the placeholder tokens ``<img>`` / ``<emb>`` (kept as items).

    With `strip_added_token_whitespace` (default; the reference's transformers 4.33.2 behaviour, which the
    released checkpoints were trained with) white space next to a placeholder is stripped and segments that
    become empty are dropped. With False, the text is split as is (transformers ≥ 4.34 behaviour).
    """
    parts = _PLACEHOLDERS.split(text)
    out: list[str] = []
    for i, part in enumerate(parts):
        if part in (IMG_TOKEN, EMB_TOKEN):
            out.append(part)
            continue
        if strip_added_token_whitespace:
            if i > 0:
                part = part.lstrip()
            if i < len(parts) - 1:
                part = part.rstrip()
        if part:
            out.append(part)
    return out


def encode_prompt(segments: Sequence[str], encode_text: Callable[[str], list[int]], layout: IdLayout) -> list[int]:
    """Ids of a segmented prompt: each text segment encoded on its own (no BOS), placeholders spliced in."""
    ids: list[int] = []
    for seg in segments:
        if seg == IMG_TOKEN:
            ids.append(layout.img_id)
        elif seg == EMB_TOKEN:
            ids.append(layout.emb_id)
        else:
            ids.extend(int(i) for i in encode_text(seg))
    return ids
