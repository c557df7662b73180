"""Full-size LaVIT modules have exactly the upstream parameter names and shapes (../shared/spec/keys/*.txt).

The modules are built on the ``meta`` device (no memory, no init cost). The key listings collapse the
per-block entries to ``blocks.N.``; their header states the total tensor and element counts.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pigeon_utils.lavit import (
    DynamicVisualTokenizer,
    EVAVisionTransformer,
    HighresVQDecoder,
    LaVITConfig,
    VQDecoder,
)

pytestmark = pytest.mark.shared

_BLOCK = re.compile(r"(^|\.)blocks\.\d+\.")
_HEADER = re.compile(r":\s*([\d,]+) tensors,\s*([\d,]+) elements")


def parse_keys(path: Path) -> tuple[dict[str, list[int]], int, int]:
    """-> ({collapsed name: shape}, n_tensors, n_elements) from a keys_*.txt listing."""
    lines = path.read_text().splitlines()
    header = _HEADER.search(lines[0])
    assert lines[0].startswith("#") and header, f"{path.name}: unexpected header {lines[0]!r}"
    shapes: dict[str, list[int]] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip() or line.startswith("#"):
            continue
        name, shape, dtype = line.split("\t")
        assert dtype == "float32", f"{path.name}:{lineno}: dtype {dtype}"
        shapes[name] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return shapes, int(header[1].replace(",", "")), int(header[2].replace(",", ""))


def collapse(state: dict[str, torch.Tensor], what: str) -> tuple[dict[str, list[int]], int, int]:
    """Collapse ``blocks.<i>.`` to ``blocks.N.``, checking every block has the same shapes."""
    shapes: dict[str, list[int]] = {}
    for name, t in state.items():
        key = _BLOCK.sub(lambda m: f"{m[1]}blocks.N.", name)
        assert shapes.setdefault(key, list(t.shape)) == list(t.shape), f"{what}: {name} shape differs across blocks"
        assert t.dtype == torch.float32, f"{what}: {name} dtype {t.dtype}"
    return shapes, len(state), sum(t.numel() for t in state.values())


def assert_matches(state: dict[str, torch.Tensor], listing: Path, what: str) -> None:
    expected, n_expected, el_expected = parse_keys(listing)
    ours, n, el = collapse(state, what)
    missing = sorted(set(expected) - set(ours))
    extra = sorted(set(ours) - set(expected))
    assert not missing and not extra, f"{what} vs {listing.name}: missing {missing}, unexpected {extra}"
    wrong = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not wrong, f"{what} vs {listing.name}: shape (ours, expected) {wrong}"
    assert (n, el) == (n_expected, el_expected), (
        f"{what}: {n} tensors / {el} elements, {listing.name} says {n_expected} / {el_expected}")


@pytest.fixture(scope="module")
def real() -> LaVITConfig:
    return LaVITConfig.real()


def test_eva_vitg_keys(keys_dir: Path, real: LaVITConfig) -> None:
    with torch.device("meta"):
        eva = EVAVisionTransformer(real.tokenizer.encoder)
    assert_matches(eva.state_dict(), keys_dir / "keys_eva_vitg.txt", "EVAVisionTransformer (real)")


def test_visual_tokenizer_keys(keys_dir: Path, real: LaVITConfig) -> None:
    with torch.device("meta"):
        tok = DynamicVisualTokenizer(real.tokenizer)
    state = tok.state_dict()
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    rest = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    assert_matches(encoder, keys_dir / "keys_eva_vitg.txt", "DynamicVisualTokenizer encoder.*")
    assert_matches(rest, keys_dir / "keys_visual_tokenizer.txt", "DynamicVisualTokenizer minus encoder.*")


def test_highres_decoder_keys(keys_dir: Path, real: LaVITConfig) -> None:
    with torch.device("meta"):
        dec = HighresVQDecoder(real.decoder)
    assert_matches(dec.state_dict(), keys_dir / "keys_highres_decoder.txt", "HighresVQDecoder (real)")


def test_lowres_decoder_keys(keys_dir: Path, real: LaVITConfig) -> None:
    with torch.device("meta"):
        dec = VQDecoder(real.decoder)
    assert_matches(dec.state_dict(), keys_dir / "keys_lowres_decoder.txt", "VQDecoder (real)")


def test_collapse_rejects_block_shape_mismatch() -> None:
    state = {"blocks.0.w": torch.zeros(2), "blocks.1.w": torch.zeros(3)}
    with pytest.raises(AssertionError, match="shape differs across blocks"):
        collapse(state, "probe")
