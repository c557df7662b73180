"""LaVIT checkpoint loader: a tiny random checkpoint in the real folder layout loads back exactly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pigeon_utils.lavit import DynamicVisualTokenizer, HighresVQDecoder, LaVITConfig, VQDecoder
from pigeon_utils.lavit.checkpoint import (
    HUB_ID,
    LaVITCheckpoint,
    LaVITCheckpointError,
    StateDictMismatchError,
    read_state_dict,
)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return module


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: key sets differ"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


@pytest.fixture(scope="module")
def tiny() -> LaVITConfig:
    return LaVITConfig.tiny()


@pytest.fixture(scope="module")
def originals(tiny: LaVITConfig) -> dict[str, torch.nn.Module]:
    return {"tok": _randomize(DynamicVisualTokenizer(tiny.tokenizer), 1),
            "tok_und": _randomize(DynamicVisualTokenizer(tiny.tokenizer), 2),
            "high": _randomize(HighresVQDecoder(tiny.decoder), 3),
            "low": _randomize(VQDecoder(tiny.decoder), 4)}


@pytest.fixture()
def ckpt_dir(tmp_path: Path, originals) -> Path:
    """A checkpoint folder in the rain1011/LaVIT-7B-v2 layout, custom parts written with torch.save."""
    root = tmp_path / "LaVIT-7B-v2"
    vt, lm = root / "visual_tokenizer", root / "language_model"
    for d in (vt, lm, *(root / "highres_pixel_decoding" / n for n in ("unet", "vae", "scheduler"))):
        d.mkdir(parents=True)
    tok = originals["tok"].state_dict()
    torch.save(originals["tok"].encoder.state_dict(), vt / "eva_vitg_psz14.bin")
    torch.save({k: v for k, v in tok.items() if not k.startswith(("encoder.", "vit_proj."))},
               vt / "tokenizer_encoder.bin")
    und = originals["tok_und"].state_dict()
    torch.save({k: v for k, v in und.items() if k.startswith(("causal_encoder.", "vit_proj."))},
               lm / "visual_weight.bin")
    torch.save(originals["high"].state_dict(), vt / "highres_tokenizer_decoder.bin")
    torch.save(originals["low"].state_dict(), vt / "tokenizer_decoder.bin")
    return root


def test_load_tiny_checkpoint(ckpt_dir: Path, tiny: LaVITConfig, originals) -> None:
    ck = LaVITCheckpoint(ckpt_dir, tiny)
    ck.require_dirs()
    tok, reports = ck.load_visual_tokenizer()
    expected = originals["tok"].state_dict()
    ours = tok.state_dict()
    # vit_proj is not in tokenizer_encoder.bin: reported as missing, everything else identical.
    assert reports[1].missing_keys == sorted(k for k in ours if k.startswith(("encoder.", "vit_proj.")))
    assert reports[1].unexpected_keys == []
    _assert_same({k: v for k, v in ours.items() if not k.startswith("vit_proj.")},
                 {k: v for k, v in expected.items() if not k.startswith("vit_proj.")}, "tokenizer")

    tok_u, reports_u = ck.load_visual_tokenizer(for_understanding=True)
    und = originals["tok_und"].state_dict()
    for k, v in tok_u.state_dict().items():
        src = und if k.startswith(("causal_encoder.", "vit_proj.")) else expected
        assert torch.equal(v, src[k]), f"understanding tokenizer: {k} not from the right file"
    assert len(reports_u) == 3 and reports_u[2].path.name == "visual_weight.bin"

    _assert_same(ck.load_highres_decoder().state_dict(), originals["high"].state_dict(), "highres decoder")
    _assert_same(ck.load_lowres_decoder().state_dict(), originals["low"].state_dict(), "lowres decoder")
    assert torch.equal(ck.load_codebook().embedding.weight, expected["quantize.embedding.weight"])
    _assert_same(ck.load_eva().state_dict(), originals["tok"].encoder.state_dict(), "eva")


def test_safetensors_is_accepted(ckpt_dir: Path, tiny: LaVITConfig, originals) -> None:
    vt = ckpt_dir / "visual_tokenizer"
    state = read_state_dict(vt / "highres_tokenizer_decoder.bin")
    (vt / "highres_tokenizer_decoder.bin").unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, str(vt / "highres_tokenizer_decoder.safetensors"))
    dec = LaVITCheckpoint(ckpt_dir, tiny).load_highres_decoder()
    _assert_same(dec.state_dict(), originals["high"].state_dict(), "highres decoder from safetensors")


def test_missing_file_error(ckpt_dir: Path, tiny: LaVITConfig) -> None:
    (ckpt_dir / "visual_tokenizer" / "eva_vitg_psz14.bin").unlink()
    with pytest.raises(LaVITCheckpointError) as info:
        LaVITCheckpoint(ckpt_dir, tiny).load_visual_tokenizer()
    msg = str(info.value)
    assert str(ckpt_dir / "visual_tokenizer" / "eva_vitg_psz14.bin") in msg
    assert HUB_ID in msg and "Expected layout" in msg
    for name in ("language_model/", "visual_tokenizer/", "tokenizer_encoder.bin", "highres_tokenizer_decoder.bin",
                 "highres_pixel_decoding/", "unet/"):
        assert name in msg, f"layout in the error message lacks {name}"
    assert isinstance(info.value, FileNotFoundError)

    with pytest.raises(LaVITCheckpointError, match="checkpoint folder itself"):
        LaVITCheckpoint(ckpt_dir / "nope", tiny)
    (ckpt_dir / "highres_pixel_decoding" / "vae").rmdir()
    with pytest.raises(LaVITCheckpointError, match="vae"):
        LaVITCheckpoint(ckpt_dir, tiny).require_dirs()


def test_key_mismatches_are_reported(ckpt_dir: Path, tiny: LaVITConfig) -> None:
    vt = ckpt_dir / "visual_tokenizer"
    state = read_state_dict(vt / "tokenizer_decoder.bin")
    state["unet_proj_extra.weight"] = torch.zeros(1)
    del state["norm.bias"]
    torch.save(state, vt / "tokenizer_decoder.bin")
    with pytest.raises(StateDictMismatchError) as info:
        LaVITCheckpoint(ckpt_dir, tiny).load_lowres_decoder()
    assert info.value.missing_keys == ["norm.bias"] and info.value.unexpected_keys == ["unet_proj_extra.weight"]
    assert "tokenizer_decoder.bin" in str(info.value)

    enc = read_state_dict(vt / "tokenizer_encoder.bin")
    del enc["quantize.embedding.weight"]
    enc["something.else"] = torch.zeros(1)
    torch.save(enc, vt / "tokenizer_encoder.bin")
    with pytest.raises(StateDictMismatchError, match=r"missing keys \[quantize.embedding.weight\]"):
        LaVITCheckpoint(ckpt_dir, tiny).load_visual_tokenizer()

    high = read_state_dict(vt / "highres_tokenizer_decoder.bin")
    high["in_proj.weight"] = torch.zeros(3, 3)
    torch.save(high, vt / "highres_tokenizer_decoder.bin")
    with pytest.raises(StateDictMismatchError, match=r"in_proj.weight: \[3, 3\] vs \[64, 32\]"):
        LaVITCheckpoint(ckpt_dir, tiny).load_highres_decoder()


def test_unknown_keys_in_non_strict_file_are_warned(ckpt_dir: Path, tiny: LaVITConfig) -> None:
    vt = ckpt_dir / "visual_tokenizer"
    enc = read_state_dict(vt / "tokenizer_encoder.bin")
    enc["decoder.extra"] = torch.zeros(1)
    torch.save(enc, vt / "tokenizer_encoder.bin")
    with pytest.warns(UserWarning, match="decoder.extra"):
        _, reports = LaVITCheckpoint(ckpt_dir, tiny).load_visual_tokenizer()
    assert reports[1].unexpected_keys == ["decoder.extra"]


def test_non_state_dict_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.bin"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(TypeError, match="flat state dict"):
        read_state_dict(path)
