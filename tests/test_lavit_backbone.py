"""The LaVIT backbone on a tiny checkpoint written in the real layout: load, tokenize, embed, generate, decode; and the
loader's refusals (missing file -> expected layout + download source; unfitting keys -> named, never guessed)."""
from __future__ import annotations

import inspect
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pigeon_utils.backbone import Backbone, CheckpointError
from conftest import NOTEBOOK_PREREQUISITES, NOTEBOOK_SMOKE

from pigeon_utils.batch import list_notebooks, run_batch
from pigeon_utils.lavit import LaVITConfig
from pigeon_utils.lavit.backbone import CONFIG_FILE, config_from_dict, config_to_dict, load_lavit_backbone
from pigeon_utils.lavit.checkpoint import HUB_ID, read_state_dict
from pigeon_utils.lavit.errors import LaVITMissingFileError, LaVITWeightsError
from pigeon_utils.lavit.tiny_checkpoint import build_text_tokenizer, write_tiny_checkpoint
from pigeon_utils.worlds import load_backbone

REPO = Path(__file__).resolve().parents[1]
#: every numbered notebook from 02 on runs with preset="lavit" on the tiny checkpoint (notebooks added later join);
#: those that feed a later one (03, 04) run inside its chain
_FEEDERS = {n for before in NOTEBOOK_PREREQUISITES.values() for n in before}
LAVIT_NOTEBOOKS = [nb.name[:2] for nb in list_notebooks() if nb.name[:2] >= "02" and nb.name[:2] not in _FEEDERS]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("lavit") / "lavit-tiny", seed=0)


@pytest.fixture(scope="module")
def bb(tiny_dir: Path) -> Backbone:
    return load_lavit_backbone(tiny_dir, device="cpu")


@pytest.fixture()
def ckpt_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "copy"))


def _images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    sizes = [(100, 130), (90, 90), (64, 48)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(n)]


# ------------------------------------------------------------------------------------------ the tiny checkpoint
def test_tiny_checkpoint_has_the_real_layout(tiny_dir: Path) -> None:
    for rel in ["visual_tokenizer/eva_vitg_psz14.bin", "visual_tokenizer/tokenizer_encoder.bin",
                "visual_tokenizer/highres_tokenizer_decoder.bin", "visual_tokenizer/tokenizer_decoder.bin",
                "language_model/config.json", "language_model/visual_weight.bin", "language_model/tokenizer.json",
                "highres_pixel_decoding/unet/config.json", "highres_pixel_decoding/unet/diffusion_pytorch_model.bin",
                "highres_pixel_decoding/vae/config.json", "highres_pixel_decoding/scheduler/scheduler_config.json",
                CONFIG_FILE]:
        assert (tiny_dir / rel).is_file(), rel
    size = sum(f.stat().st_size for f in tiny_dir.rglob("*") if f.is_file())
    assert size < 20e6, f"tiny checkpoint is {size / 1e6:.1f} MB"
    llm_cfg = json.loads((tiny_dir / "language_model/config.json").read_text())
    assert llm_cfg["vocab_size"] == 32002 + LaVITConfig.tiny().tokenizer.n_code
    # the custom .bin files are plain state dicts that torch.load(weights_only=True) reads
    assert "quantize.embedding.weight" in read_state_dict(tiny_dir / "visual_tokenizer/tokenizer_encoder.bin")


def test_tiny_checkpoint_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_checkpoint(tmp_path / "again", seed=0)
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    for rel in ["visual_tokenizer/highres_tokenizer_decoder.bin",
                "highres_pixel_decoding/unet/diffusion_pytorch_model.bin"]:
        a, b, c = (read_state_dict(d / rel) for d in (tiny_dir, again, other))
        assert all(torch.equal(a[k], b[k]) for k in a), rel
        assert not all(torch.equal(a[k], c[k]) for k in a), rel
    tok_json = "language_model/tokenizer.json"
    assert (tiny_dir / tok_json).read_bytes() == (again / tok_json).read_bytes()
    with pytest.raises(FileExistsError):
        write_tiny_checkpoint(again)


def test_config_file_round_trip_and_errors() -> None:
    for cfg in (LaVITConfig.tiny(), LaVITConfig.real()):
        assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    bad = config_to_dict(LaVITConfig.tiny())
    bad["decoder"]["n_queries"] = 3
    with pytest.raises(ValueError, match="n_queries"):
        config_from_dict(bad)


# ------------------------------------------------------------------------------------------ end to end
def test_backbone_parts_and_id_layout(bb: Backbone) -> None:
    cfg = LaVITConfig.tiny()
    assert bb.preset == "lavit"
    assert (bb.layout.img_id, bb.layout.emb_id, bb.layout.visual_offset, bb.layout.pad_id) == (32000, 32001, 32002, 2)
    assert bb.layout.codebook_size == cfg.tokenizer.n_code == bb.tokenizer.codebook_size
    assert bb.lmm.config.vocab_size == bb.layout.vocab_size
    tok = bb.text_tokenizer
    assert tok.convert_ids_to_tokens([32000, 32001]) == ["<img>", "<emb>"]
    assert tok.pad_token_id == 2 and tok.padding_side == "left"
    ids = bb.encode_text("The user likes the following stickers:")
    assert ids and max(ids) < 32000 and 1 not in ids  # text ids only, no BOS
    assert (bb.detokenizer.cond_dim, bb.detokenizer.pooled_dim) == (cfg.decoder.prompt_dim, cfg.decoder.pooled_dim)
    assert not any(p.requires_grad for p in bb.lmm.parameters())


def test_tokenize_embed_generate_decode(bb: Backbone) -> None:
    images = _images(2)
    toks = bb.tokenizer.tokenize(images, generator=torch.Generator().manual_seed(0))
    again = bb.tokenizer.tokenize(images, generator=torch.Generator().manual_seed(0))
    assert toks.grid == (8, 8) and toks.patch_size == 14 and len(toks) == 2
    for codes, patches, codes2 in zip(toks.codes, toks.patch_index, again.codes):
        assert torch.equal(codes, codes2)  # deterministic given the generator
        assert 0 < len(codes) <= 64 and len(patches) == len(codes)
        assert codes.min() >= 0 and codes.max() < bb.layout.codebook_size
        assert bool((patches[1:] > patches[:-1]).all()) and patches.min() >= 0 and patches.max() < 64

    # LMM: visual ids embed like any other id; a prompt as inputs_embeds gives the same logits as input_ids
    vis = bb.visual_ids(toks)
    assert bool(bb.layout.is_visual(vis[0]).all())
    prompt = torch.tensor([bb.encode_text("a sticker of a cat") + [bb.layout.img_id] + vis[0].tolist()
                           + [bb.layout.emb_id, bb.layout.img_id]])
    with torch.no_grad():
        by_ids = bb.lmm(input_ids=prompt).logits
        by_embeds = bb.lmm(inputs_embeds=bb.lmm.get_input_embeddings()(prompt)).logits
    assert by_ids.shape == (1, prompt.shape[1], bb.layout.vocab_size)
    torch.testing.assert_close(by_embeds, by_ids)

    # a few greedy visual tokens with the KV cache, checked against a full recomputation
    cache_kw = "cache" if "cache" in inspect.signature(bb.lmm.forward).parameters else "past_key_values"
    seq, past, new = prompt, None, []
    with torch.no_grad():
        for _ in range(4):
            out = bb.lmm(input_ids=seq if past is None else seq[:, -1:], use_cache=True, **{cache_kw: past})
            past = getattr(out, cache_kw)
            logits = out.logits[:, -1].clone()
            logits[:, : bb.layout.visual_offset] = float("-inf")
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            new.append(int(nxt))
        full = bb.lmm(input_ids=seq[:, :-1]).logits[0, prompt.shape[1] - 1:]
    full[:, : bb.layout.visual_offset] = float("-inf")
    assert full.argmax(-1).tolist() == new
    generated = torch.tensor(new) - bb.layout.visual_offset
    assert bool((generated >= 0).all())

    # detokenize + decode (few DDIM steps): right shape, in [0, 1], deterministic given the generator
    codes = [generated, toks.codes[1]]
    cond, pooled = bb.detokenizer.embed(codes)
    assert cond.shape == (2, 64, 64) and pooled.shape == (2, 40)
    imgs = bb.decode_codes(codes, generator=torch.Generator().manual_seed(3), num_inference_steps=2)
    same = bb.decode_codes(codes, generator=torch.Generator().manual_seed(3), num_inference_steps=2)
    other = bb.decode_codes(codes, generator=torch.Generator().manual_seed(4), num_inference_steps=2)
    assert imgs.shape == (2, 3, 64, 64) and imgs.dtype == torch.float32
    assert imgs.min() >= 0 and imgs.max() <= 1
    assert torch.equal(imgs, same) and not torch.equal(imgs, other)


def test_fixed_keep_decision_keeps_every_patch(bb: Backbone) -> None:
    toks = bb.tokenizer.tokenize(_images(1), keep=torch.ones(1, 64))
    assert torch.equal(toks.patch_index[0], torch.arange(64))


def test_detokenizer_uses_only_masked_tokens_in_order(bb: Backbone) -> None:
    det = bb.detokenizer
    codes = torch.tensor([[5, 7, 9, 11]])
    holes = torch.tensor([[True, False, True, True]])
    a = det(codes, holes)
    b = det(torch.tensor([[5, 9, 11, 0]]), torch.tensor([[True, True, True, False]]))
    torch.testing.assert_close(a, b)  # masked tokens are dropped and the rest compacted, padding ignored
    c = det(torch.tensor([[9, 5, 11, 0]]), torch.tensor([[True, True, True, False]]))
    assert not torch.allclose(a[0], c[0])  # order matters (positions among kept tokens)
    long = torch.arange(80)[None] % bb.layout.codebook_size  # > 64 tokens: the first 64 are used
    torch.testing.assert_close(det(long, torch.ones_like(long, dtype=torch.bool)),
                               det(long[:, :64], torch.ones(1, 64, dtype=torch.bool)))
    with pytest.raises(ValueError, match="visual_offset|code ids"):
        det(codes + bb.layout.visual_offset, torch.ones_like(codes, dtype=torch.bool))


def test_bf16_path_runs_on_cpu(tiny_dir: Path) -> None:
    """The reduced-precision code path (CUDA's default) also runs: bf16 Linear weights, fp32 norms, autocast."""
    bb16 = load_lavit_backbone(tiny_dir, dtype=torch.bfloat16)
    eva = bb16.tokenizer.model.encoder
    assert eva.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 and eva.blocks[0].norm1.weight.dtype == torch.float32
    assert bb16.tokenizer.model.quantize.embedding.weight.dtype == torch.float32
    assert next(bb16.lmm.parameters()).dtype == torch.bfloat16
    toks = bb16.tokenizer.tokenize(_images(2), generator=torch.Generator().manual_seed(0))
    imgs = bb16.decode_codes(toks.codes[:1], generator=torch.Generator().manual_seed(0), num_inference_steps=1)
    assert imgs.shape == (1, 3, 64, 64) and imgs.dtype == torch.float32 and bool(torch.isfinite(imgs).all())


def test_load_backbone_dispatches_to_lavit(tiny_dir: Path) -> None:
    """``pigeon_utils.worlds.load_backbone("lavit", ...)`` must reach :func:`load_lavit_backbone`."""
    assert isinstance(load_backbone("lavit", tiny_dir), Backbone)


def test_8bit_needs_bitsandbytes_and_cuda(tiny_dir: Path) -> None:
    with pytest.raises((ImportError, ValueError), match="bitsandbytes|CUDA"):
        load_lavit_backbone(tiny_dir, device="cpu", load_in_8bit=True)


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("rel", [
    "visual_tokenizer/eva_vitg_psz14.bin",
    "visual_tokenizer/highres_tokenizer_decoder.bin",
    "language_model/model.safetensors",
    "language_model/tokenizer.json",
    "highres_pixel_decoding/unet",
    "highres_pixel_decoding/scheduler/scheduler_config.json",
])
def test_missing_file_lists_layout_and_source(ckpt_copy: Path, rel: str) -> None:
    target = ckpt_copy / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(LaVITMissingFileError) as info:
        load_lavit_backbone(ckpt_copy)
    msg = str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert Path(rel).parts[0] in msg and Path(rel).parts[-1].split(".")[0] in msg
    assert "Expected layout" in msg and "highres_pixel_decoding/" in msg and HUB_ID in msg


def test_missing_folder_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=HUB_ID):
        load_lavit_backbone(tmp_path / "nowhere")


def test_unexpected_key_in_strict_bin_is_reported(ckpt_copy: Path) -> None:
    path = ckpt_copy / "visual_tokenizer/highres_tokenizer_decoder.bin"
    state = read_state_dict(path)
    state["extra.weight"] = torch.zeros(3)
    torch.save(state, path)
    with pytest.raises(LaVITWeightsError, match=r"extra\.weight") as info:
        load_lavit_backbone(ckpt_copy)
    assert info.value.unexpected_keys == ["extra.weight"] and isinstance(info.value, CheckpointError)


def test_missing_required_key_is_reported(ckpt_copy: Path) -> None:
    path = ckpt_copy / "visual_tokenizer/tokenizer_encoder.bin"
    state = read_state_dict(path)
    del state["quantize.embedding.weight"]
    torch.save(state, path)
    with pytest.raises(LaVITWeightsError, match=r"quantize\.embedding\.weight"):
        load_lavit_backbone(ckpt_copy)


def test_unexpected_key_in_lenient_bin_is_logged_not_used(ckpt_copy: Path, caplog) -> None:
    path = ckpt_copy / "visual_tokenizer/tokenizer_encoder.bin"
    state = read_state_dict(path)
    state["not_a_module.bias"] = torch.zeros(2)
    torch.save(state, path)
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="not_a_module"):
        bb = load_lavit_backbone(ckpt_copy)
    assert any("not_a_module.bias" in r.getMessage() for r in caplog.records)
    reports = bb.extras["load_reports"]
    assert any("not_a_module.bias" in r.unexpected_keys for r in reports)


def test_llm_missing_weight_is_an_error_not_random_init(ckpt_copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = ckpt_copy / "language_model/model.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if "layers.1.self_attn.q_proj" in k)
    del state[key]
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(LaVITWeightsError, match=r"layers\.1\.self_attn\.q_proj"):
        load_lavit_backbone(ckpt_copy)


def test_unet_that_does_not_fit_the_detokenizer(ckpt_copy: Path) -> None:
    path = ckpt_copy / "highres_pixel_decoding/unet/config.json"
    cfg = json.loads(path.read_text())
    cfg["cross_attention_dim"] = 2048
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="cross_attention_dim=2048"):
        load_lavit_backbone(ckpt_copy)


def test_text_tokenizer_must_put_img_on_32000(ckpt_copy: Path) -> None:
    lm = ckpt_copy / "language_model"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (lm / f).unlink()
    build_text_tokenizer(n_entries=31990).save_pretrained(lm)
    with pytest.raises(CheckpointError, match="31990 entries.*32000"):
        load_lavit_backbone(ckpt_copy)


# ------------------------------------------------------------------------------------------ notebooks
@pytest.mark.slow
@pytest.mark.parametrize("number", LAVIT_NOTEBOOKS)
def test_notebook_runs_with_the_lavit_preset(tiny_dir: Path, tmp_path: Path, number: str) -> None:
    """The real code path end to end on the CPU: notebook NN with preset="lavit", the tiny checkpoint, toy images;
    a notebook that reads an earlier one's output runs after it, in the same run directory (03 → 04 → 05 once)."""
    common = {"checkpoint_dir": str(tiny_dir), "data_dir": str(REPO / "dataset" / "toy-sticker"), "device": "cpu",
              "clip_preset": "toy"}  # no ViT-H-14 here: notebooks that need scores use the toy CLIP
    chain = [*NOTEBOOK_PREREQUISITES[number], number] if number in NOTEBOOK_PREREQUISITES else [number]
    for nb in chain:
        outs = run_batch("lavit", "sticker", tmp_path / "run", only=[nb], parameters={**common, **NOTEBOOK_SMOKE[nb]})
        assert len(outs) == 1 and outs[0].is_file()


def test_sentencepiece_tokenizer_without_its_packages(ckpt_copy: Path, monkeypatch) -> None:
    """LaVIT ships only tokenizer.model; reading it needs sentencepiece + protobuf, else a clear error says so."""
    import pigeon_utils.lavit.language_model as lm_module

    lm = ckpt_copy / "language_model"
    (lm / "tokenizer.json").unlink()
    (lm / "tokenizer.model").write_bytes(b"")
    monkeypatch.setattr(lm_module, "missing_sentencepiece_modules", lambda: ["sentencepiece", "protobuf"])
    with pytest.raises(ImportError, match="pip install sentencepiece protobuf.*tokenizer.json"):
        load_lavit_backbone(ckpt_copy)
