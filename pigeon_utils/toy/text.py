"""The toy LMM's text tokenizer: a word-level ``tokenizers`` model over the toy world's vocabulary.

Ids follow LaVIT's layout (docs/algorithm.md §0): ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 (also pad), the words, then the
two added tokens ``<img>`` (= ``[IMG]``) and ``<emb>`` (= ``[/IMG]``), then — in the LMM only — the visual ids. The
vocabulary is every word of the toy captions, of the Pigeon prompt templates and of the toy datasets' prompts,
semantics, titles and intros (lower-cased; digits one by one), so every prompt Pigeon builds in the toy world
encodes without ``<unk>``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pigeon_utils.prompts import EMB_TOKEN, IMG_TOKEN, TEMPLATES, IdLayout

SPECIALS = ("<unk>", "<s>", "</s>")


def toy_captions() -> list[str]:
    """The caption of every factor combination (glyph × colour × pattern × stroke)."""
    from pigeon_utils.toy.data import COLOURS, GLYPHS, PATTERNS, STROKES, ToyFactors

    return [ToyFactors(g, c, p, s).caption() for g in GLYPHS for c in COLOURS for p in PATTERNS for s in STROKES]


def toy_text_corpus(dataset_dir: Path | None) -> list[str]:
    """Captions, prompt templates and, when `dataset_dir` holds them, every text of the toy datasets."""
    from pigeon_utils.toy.data import EMOTION_GLYPH, GENRE_GLYPH

    texts = toy_captions() + [f"{v}" for t in TEMPLATES.values() for v in vars(t).values()]
    texts += list(EMOTION_GLYPH) + list(GENRE_GLYPH)
    if dataset_dir is not None:
        from pigeon_utils.data import open_dataset

        for name, scenario in (("toy-sticker", "sticker"), ("toy-poster", "movie")):
            root = Path(dataset_dir) / name
            if not root.is_dir():
                continue
            d = open_dataset(root, scenario)
            texts += d.semantics
            texts += [d.prompt(s) for split in ("train", "valid", "test") for s in d.samples(split)]
            if d.movies:
                texts += [m.title + " " + m.intro + " " + " ".join(m.genres) for m in d.movies.values()]
    return texts


def build_text_tokenizer(texts: Iterable[str]):
    """Train the word-level tokenizer on `texts` and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    texts = [t.replace(IMG_TOKEN, " ").replace(EMB_TOKEN, " ") for t in texts]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIALS), min_frequency=1,
                                                             show_progress=False))
    tok.add_special_tokens([IMG_TOKEN, EMB_TOKEN])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", padding_side="left")


def layout_for(text_tokenizer, codebook_size: int) -> IdLayout:
    """LaVIT's id layout for a toy text tokenizer: ``<img>``, ``<emb>`` right after the words, then the codes."""
    img, emb = text_tokenizer.convert_tokens_to_ids([IMG_TOKEN, EMB_TOKEN])
    if emb != img + 1 or emb != len(text_tokenizer) - 1:
        raise ValueError(f"text tokenizer: <img>/<emb> must be its last two ids, got {img}/{emb} of "
                         f"{len(text_tokenizer)}")
    return IdLayout(img_id=img, emb_id=emb, visual_offset=emb + 1, codebook_size=codebook_size,
                    pad_id=text_tokenizer.pad_token_id)
