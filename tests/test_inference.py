"""Inference (spec §5): the shared-prefix α_r sweep equals separate runs, sampling limits, deterministic and resumable
sweeps with atomic files.

The backbone is the toy smoke build (seconds); the Pigeon model is freshly initialised from a fixed seed (no
training is needed to check the mechanics).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import pigeon_utils  # noqa: F401
from test_sft import DATA, build_smoke, load_smoke


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pigeon_utils.data import open_dataset
    from pigeon_utils.model import PigeonModel, PigeonModelConfig

    bb = load_smoke(build_smoke(tmp_path_factory.mktemp("toy-smoke-inf") / "toy"))
    torch.manual_seed(0)
    model = PigeonModel(bb, PigeonModelConfig(adapter_hidden=16, mask_feedforward=32)).eval()
    return model, open_dataset(DATA, "movie")


def _batch(model, ds, ks, seed=0):
    from pigeon_utils.inference import SeededImageTokens, sweep_batch

    samples = ds.samples("test")
    return sweep_batch(ds, [samples[k] for k in ks], ks, model.backbone,
                       SeededImageTokens(ds, model.backbone.tokenizer, seed), seed)


def test_shared_prefix_equals_full_prompt_per_ratio(world):
    from pigeon_utils.inference import prefill

    model, ds = world
    batch = _batch(model, ds, [0, 1, 2])
    ratios = [0.0, 0.4, 1.0]
    logits, _, _, _ = prefill(model, batch, ratios)
    keep = model.sweep_keep(batch.masks, ratios, noise=batch.noise)
    hist = batch.masks.type_ids == 1
    with torch.no_grad():
        for j, r in enumerate(ratios):
            x, km = model.input_embeddings(batch, r, inference=True)
            assert torch.equal(keep[j], km.keep)  # one scoring pass gives the per-ratio masks
            assert torch.equal(keep[j][hist], keep[0][hist])  # the history mask does not change with α_r
            full = model.lmm(inputs_embeds=x, attention_mask=batch.seq.attention_mask,
                             position_ids=batch.seq.position_ids).logits[:, -1]
            torch.testing.assert_close(logits[j::len(ratios)], full, rtol=1e-4, atol=1e-5)
    # the reference keeps fewer tokens as α_r grows
    n_ref = (keep * (batch.masks.type_ids == 2)).sum(-1)
    assert bool((n_ref[0] >= n_ref[1]).all() and (n_ref[1] >= n_ref[2]).all()) and bool((n_ref[0] > n_ref[2]).any())


def test_sweep_equals_separate_runs_and_respects_limits(world):
    from pigeon_utils.inference import SamplingConfig, sweep_tokens

    model, ds = world
    batch = _batch(model, ds, [0, 1, 2])
    ratios = [0.0, 0.5, 1.0]
    sc = SamplingConfig(min_new_tokens=3, max_new_tokens=6)
    sweep = sweep_tokens(model, batch, ratios, sc, seed=5)
    for j, r in enumerate(ratios):
        alone = sweep_tokens(model, batch, [r], sc, seed=5, share_prefix=False)
        assert all(torch.equal(sweep[b][j], alone[b][0]) for b in range(3)), r
    # a sample's tokens do not depend on the batch it is in; another seed gives other tokens
    single = sweep_tokens(model, _batch(model, ds, [1]), ratios, sc, seed=5)
    assert all(torch.equal(single[0][j], sweep[1][j]) for j in range(3))
    other = sweep_tokens(model, batch, ratios, sc, seed=6)
    assert any(not torch.equal(other[b][j], sweep[b][j]) for b in range(3) for j in range(3))
    lengths = [len(c) for row in sweep for c in row]
    assert min(lengths) >= 3 and max(lengths) <= 6
    codebook = model.layout.codebook_size
    assert all(int(c.min()) >= 0 and int(c.max()) < codebook for row in sweep for c in row)


def test_sampling_filters_and_bad_values():
    from pigeon_utils.inference import InferenceConfig, SamplingConfig, _filter_logits, _sample

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(_filter_logits(logits, 2, 1.0)[0, :2]).all()
    # top-p 0.5: the most likely id alone has p ≈ 0.64 ≥ 0.5
    kept = ~torch.isinf(_filter_logits(logits, 0, 0.5))
    assert kept.tolist() == [[False, False, False, True]]
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).expand(3, 4)
    assert _sample(probs, torch.tensor([0.0, 0.49, 0.999])).tolist() == [1, 1, 3]
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingConfig(min_new_tokens=0)
    with pytest.raises(ValueError, match=r"ref_mask_ratios must lie in \[0, 1\], got \[1.5\]"):
        InferenceConfig(ref_mask_ratios=[0.0, 1.5])
    with pytest.raises(ValueError, match="duplicates"):
        InferenceConfig(ref_mask_ratios=[0.1, 0.1])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sweep_is_deterministic_and_resumes_after_interruption(world, tmp_path, monkeypatch):
    from PIL import Image

    from pigeon_utils.inference import InferenceConfig, SamplingConfig, load_index, run_sweep

    model, ds = world
    cfg = InferenceConfig(ref_mask_ratios=(0.0, 1.0), batch_size=2, seed=3, num_inference_steps=2,
                          sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=8))
    kw = dict(max_samples=4, progress=False)
    a = run_sweep(model, ds, "test", tmp_path / "a", cfg, **kw)
    assert (a.generated, a.skipped) == (4, 0)
    index = load_index(tmp_path / "a")
    assert sorted(index["samples"]) == ["0", "1", "2", "3"]
    assert set(index["samples"]["0"]["images"]) == {"0.00", "1.00"}
    png = tmp_path / "a" / index["samples"]["2"]["images"]["1.00"]["path"]
    assert png.parent.name == "1.00" and Image.open(png).size == (64, 64)
    again = run_sweep(model, ds, "test", tmp_path / "a2", cfg, **kw)
    assert _files(tmp_path / "a") == _files(tmp_path / "a2")  # same seed → identical images and index

    # interrupted after one sample, then killed while writing a PNG of the third
    b = tmp_path / "b"
    assert run_sweep(model, ds, "test", b, cfg, **kw, interrupt_after=1).generated == 1
    first = b / index["samples"]["0"]["images"]["0.00"]["path"]
    stamp = first.stat().st_mtime_ns
    real_save, calls = Image.Image.save, []

    def dying_save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # sample 1 done (2 images), die in the middle of sample 2's first image
            fp.write(b"\x89PNG\r\n")
            raise KeyboardInterrupt("killed")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, ds, "test", b, cfg, **kw)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert sorted(load_index(b)["samples"]) == ["0", "1"]  # the index holds finished samples only
    assert not (b / index["samples"]["2"]["images"]["0.00"]["path"]).exists()  # no truncated PNG under its name
    assert list(b.rglob(".*.tmp*"))  # only a temporary file was left behind
    c = run_sweep(model, ds, "test", b, cfg, **kw)
    assert (c.generated, c.skipped) == (2, 2)
    assert first.stat().st_mtime_ns == stamp  # finished images were not redone
    assert _files(b) == _files(tmp_path / "a")

    # resuming with other settings is refused, naming what differs
    with pytest.raises(ValueError, match="ref_mask_ratios"):
        run_sweep(model, ds, "test", b, InferenceConfig(ref_mask_ratios=(0.0, 0.5), seed=3, batch_size=2,
                                                        num_inference_steps=2, sampling=cfg.sampling), **kw)
    assert json.loads((b / "index.json").read_text())["config"]["ref_mask_ratios"] == [0.0, 1.0]
