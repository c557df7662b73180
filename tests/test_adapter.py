"""Tests of pigeon_utils.adapter.PigeonAdapter (golden fixture skipped without ../shared)."""
from __future__ import annotations

import json

import pytest
import torch

import pigeon_utils  # noqa: F401
from pigeon_utils.adapter import PigeonAdapter


def test_golden_adapter(golden_dir):
    """Built from config.json's constructor entry; tolerance from its tolerance.recommended."""
    from safetensors.torch import load_file

    meta = json.loads((golden_dir / "config.json").read_text())["fixtures"]["pigeon_adapter"]
    weights = load_file(str(golden_dir / "pigeon_adapter.weights.safetensors"))
    io = load_file(str(golden_dir / "pigeon_adapter.io.safetensors"))
    assert {k: list(v.shape) for k, v in io.items()} == {k: v["shape"] for k, v in meta["io"]["tensors"].items()}
    adapter = PigeonAdapter(**meta["constructor"])
    assert {k: list(v.shape) for k, v in adapter.state_dict().items()} == meta["weights"]["shapes"]
    result = adapter.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        out = adapter.eval()(io["input"])
    rec = meta["tolerance"]["recommended"]
    torch.testing.assert_close(out, io["output"], atol=float(rec["atol"]), rtol=float(rec["rtol"]))


def test_full_size_names_and_shapes(shared_dir):
    lines = (shared_dir / "spec" / "keys" / "keys_pigeon_extra.txt").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# adapter"))
    expected = {}
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.strip():
            name, shape = line.split("\t")
            expected[name] = [int(x) for x in shape.strip("[]").split(",")]
    with torch.device("meta"):
        adapter = PigeonAdapter()
    assert {k: list(v.shape) for k, v in adapter.state_dict().items()} == expected
    assert sum(p.numel() for p in adapter.parameters()) == 3_150_336


def test_forward_matches_formula_and_dropout_only_in_training():
    torch.manual_seed(0)
    adapter = PigeonAdapter(8, 4, 6, drop_prob=0.5)
    x = torch.randn(3, 8)
    expected = torch.tanh(adapter.decoder(adapter.encoder(x)))
    torch.testing.assert_close(adapter.eval()(x), expected)
    adapter.train()
    a, b = adapter(x), adapter(x)
    assert not torch.equal(a, b)  # dropout is active in training
    assert (a.abs() <= 2.0).all()  # tanh output, scaled by 1/(1-p) = 2 where kept


def test_bad_input_and_arguments():
    adapter = PigeonAdapter(8, 4, 6)
    with pytest.raises(ValueError, match="dimension 8"):
        adapter(torch.randn(2, 7))
    with pytest.raises(ValueError, match="drop_prob"):
        PigeonAdapter(drop_prob=1.0)
    with pytest.raises(ValueError, match="hid_dim"):
        PigeonAdapter(hid_dim=0)
