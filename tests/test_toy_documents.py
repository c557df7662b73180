"""Style documents for the toy LMM (in-context style) and the semantics texts the toy CLIP can learn."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pigeon_utils.prompts import IdLayout
from pigeon_utils.toy.recipe import RETIRED, SMOKE, BuildConfig, all_combos, build_command, config_from_recipe, \
    heldout_combos, parse_setting
from pigeon_utils.toy.training_data import document_captions, semantics_pairs, style_documents
from pigeon_utils.toy.lmm import document_segments
from pigeon_utils.toy.data import EMOTION_GLYPH, GENRE_GLYPH, GLYPHS, ToyFactors, poster_semantics, \
    semantics_texts, sticker_semantics

LAYOUT = IdLayout(img_id=50, emb_id=51, visual_offset=52, codebook_size=100, pad_id=2)


def test_document_segment_layout():
    codes = [torch.tensor([0, 5]), torch.tensor([1]), torch.tensor([3, 4, 7])]
    caps = [[10, 11], None, [12]]
    (seg,) = document_segments([codes], [caps], LAYOUT)
    img, end, v = LAYOUT.img_id, LAYOUT.emb_id, LAYOUT.visual_offset
    assert seg.tolist() == [10, 11, img, v + 0, v + 5, end, img, v + 1, end, 12, img, v + 3, v + 4, v + 7, end]


def test_document_segments_can_be_delimited():
    codes = [torch.tensor([0]), torch.tensor([3, 4])]
    (seg,) = document_segments([codes], [[None, [12]]], LAYOUT, bos_id=1, eos_id=2)
    img, end, v = LAYOUT.img_id, LAYOUT.emb_id, LAYOUT.visual_offset
    assert seg.tolist() == [1, img, v + 0, end, 12, img, v + 3, v + 4, end, 2]


def test_train_lmm_stops_when_its_check_reaches_the_target():
    from pigeon_utils.toy.lmm import make_llama, train_lmm

    torch.manual_seed(0)
    lmm = make_llama(LAYOUT.vocab_size, LAYOUT, hidden=16, layers=1, heads=2, intermediate=32)
    values = iter([0.2, 0.5, 0.95, 0.99])
    segs = [torch.randint(0, LAYOUT.vocab_size, (20,)) for _ in range(8)]
    out = train_lmm(lmm, segs, steps=10, batch=2, row_len=16, lr=1e-3, gen=torch.Generator().manual_seed(0),
                    progress=False, check=lambda: next(values), check_every=2, stop_at=0.9)
    assert out["steps"] == 6 and out["checks"] == [[2, 0.2], [4, 0.5], [6, 0.95]]
    assert not lmm.training
    assert "checks" not in train_lmm(lmm, segs, 2, 2, 16, 1e-3, torch.Generator().manual_seed(0), progress=False)


class _Fixed(torch.nn.Module):
    """A fake LMM whose next-token logits are one-hot at a fixed id (whatever the prompt)."""

    def __init__(self, token: int, vocab: int):
        super().__init__()
        self.token, self.vocab, self.device = token, vocab, torch.device("cpu")

    def forward(self, input_ids, attention_mask):
        logits = torch.full((*input_ids.shape, self.vocab), -30.0)
        logits[..., self.token] = 30.0
        assert attention_mask.shape == input_ids.shape and bool(attention_mask[:, -1].all())
        return type("Out", (), {"logits": logits})()


def test_copy_probes_ask_for_the_image_token_the_context_shares():
    from pigeon_utils.toy.evaluate import context_copy, copy_probes
    from pigeon_utils.toy.load import load_toy_backbone

    bb = load_toy_backbone(Path(__file__).resolve().parents[1] / "checkpoints" / "toy")
    combos = [("star", "red", "dots", "filled"), ("circle", "blue", "plain", "outline")]
    prompts, targets = copy_probes(bb.tokenizer, bb.text_tokenizer, bb.layout, combos, 3, seed=0)
    lay = bb.layout
    for p, t in zip(prompts, targets.tolist()):
        assert p[0] == bb.text_tokenizer.bos_token_id and p[-1] == lay.img_id
        firsts = [p[i + 1] for i, x in enumerate(p[:-1]) if x == lay.img_id]  # each context image's first token
        assert len(firsts) == 3 and set(firsts) == {t}  # same style -> the same image token as the target's
    assert targets[0] != targets[1]
    vocab = lay.vocab_size
    assert context_copy(_Fixed(int(targets[0]), vocab), prompts[:1], targets[:1], lay.pad_id) == pytest.approx(1.0)
    assert context_copy(_Fixed(int(targets[0]), vocab), prompts, targets, lay.pad_id, batch=1) == pytest.approx(0.5)


def test_document_segments_refuse_a_caption_count_mismatch():
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        document_segments([[torch.tensor([0])] * 3], [[None, [1]]], LAYOUT)


def test_style_documents_share_style_and_never_use_held_out_combos():
    cfg = BuildConfig()
    held = set(heldout_combos(cfg))
    train = [c for c in all_combos() if c not in held]
    ims, fs, sizes = style_documents(train, 40, (3, 7), keep=1.0, seed=3)
    assert len(ims) == len(fs) == sum(sizes) and all(3 <= k < 7 for k in sizes)
    assert ims.shape[1:] == (64, 64, 3)
    assert not any((f.glyph, f.colour, f.pattern, f.stroke) in held for f in fs)
    start = 0
    for k in sizes:  # keep = 1: every image of a document has the document's style
        assert len({f.style for f in fs[start:start + k]}) == 1
        start += k
    _, fs0, _ = style_documents(train, 40, (3, 7), keep=0.0, seed=3)
    assert len({f.style for f in fs0}) > 10  # keep = 0: styles drawn afresh


def test_document_captions_hide_the_last_images_style():
    from pigeon_utils.toy.text import build_text_tokenizer, toy_text_corpus

    tok = build_text_tokenizer(toy_text_corpus(None))
    fs = [ToyFactors("star", "red", "dots", "filled"), ToyFactors("heart", "red", "dots", "filled"),
          ToyFactors("moon", "red", "dots", "outline")]
    g = torch.Generator().manual_seed(0)
    (caps,) = document_captions(fs, [3], tok, p_caption=1.0, gen=g)
    assert tok.decode(caps[0]) == fs[0].caption() and tok.decode(caps[2]) == "a moon"
    (caps,) = document_captions(fs, [3], tok, p_caption=0.0, gen=g)
    assert caps[:2] == [None, None] and tok.decode(caps[2]) == "a moon"
    assert document_captions([], [], tok, 0.5, g) == []


def test_semantics_texts_are_the_datasets_forms():
    assert sticker_semantics("Happiness") == "a sticker showing happiness"  # the meaning, not the glyph
    with pytest.raises(ValueError, match="'Joy'"):
        sticker_semantics("Joy")
    assert poster_semantics("Drama") == "a poster of a drama movie showing a circle"
    for glyph in GLYPHS:
        expect = {sticker_semantics(e) for e, g in EMOTION_GLYPH.items() if g == glyph} \
            | {poster_semantics(n) for n, g in GENRE_GLYPH.items() if g == glyph}
        assert set(semantics_texts(glyph)) == expect and expect
    factors = [{"glyph": g} for g in GLYPHS] * 10
    idx, texts = semantics_pairs(factors, 0.25, seed=1)
    assert len(idx) == len(texts) == 20 and len(set(idx.tolist())) == 20
    assert all(t in semantics_texts(factors[i]["glyph"]) for i, t in zip(idx.tolist(), texts))


def test_smoke_recipe_names_build_fields_and_only_shrinks_the_default():
    fields = set(BuildConfig.__dataclass_fields__)
    assert set(SMOKE) <= fields and not set(RETIRED) & fields
    assert BuildConfig().lmm_copy_docs > 0 and SMOKE["lmm_copy_docs"] > 0  # both run the copy phase
    assert BuildConfig().clip_semantics > 0 and BuildConfig().detok_feature_weight > 0


def test_default_recipe_is_the_committed_checkpoints():
    """BuildConfig() is the recipe checkpoints/toy records (its retired fields at the values the build now always
    uses), and the default command builds it."""
    from pigeon_utils.toy.build import main

    manifest = json.loads((Path(__file__).resolve().parents[1] / "checkpoints/toy/manifest.json").read_text())
    assert config_from_recipe(manifest["recipe"]) == BuildConfig(seed=0)
    assert manifest["command"] == build_command("checkpoints/toy", BuildConfig()) \
        == "python -m pigeon_utils.toy.build --out checkpoints/toy --seed 0"
    with pytest.raises(ValueError, match="n_lmm_docs=5"):
        config_from_recipe({**manifest["recipe"], "n_lmm_docs": 5})
    with pytest.raises(ValueError, match="'nope'"):
        config_from_recipe({"nope": 1})
    with pytest.raises(SystemExit, match="unknown field 'nope'"):
        main(["--out", "unused", "--set", "nope=1"])


def test_manifest_command_names_the_recipe():
    from dataclasses import replace

    base = "python -m pigeon_utils.toy.build --out ck --seed 0"
    assert build_command("ck", BuildConfig()) == base
    assert build_command("ck", replace(BuildConfig(), threads=1, lmm_doc_images=[3, 7])) == base + " --set threads=1"
    assert build_command("ck", replace(BuildConfig(), clip_steps=5)) == base + " --set clip_steps=5"
    assert build_command("ck", replace(BuildConfig(seed=2, **SMOKE), figures=False, unet_channels=(8, 16))) \
        == "python -m pigeon_utils.toy.build --out ck --seed 2 --smoke --no-figures --set unet_channels=[8,16]"


def test_set_parses_json_values():
    cfg = parse_setting(parse_setting(BuildConfig(), "unet_channels=[8,16]"), "clip_lr=0.5")
    assert cfg.unet_channels == (8, 16) and cfg.clip_lr == 0.5
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_setting(cfg, "clip_lr")
