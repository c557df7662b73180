"""The toy backbone: interface, smoke build, loading, clear checkpoint errors, and the shipped checkpoint."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import pigeon_utils  # noqa: F401
from pigeon_utils.backbone import CheckpointError, VisualTokens, pad_codes
from pigeon_utils.toy.build import build
from pigeon_utils.toy.data import ToyFactors, random_factors, render, render_many
from pigeon_utils.toy.load import REQUIRED_FILES, load_toy_backbone, load_toy_clip
from pigeon_utils.toy.recipe import SMOKE, BuildConfig
from pigeon_utils.worlds import load_backbone

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "checkpoints" / "toy"


def _images(*factors: ToyFactors) -> np.ndarray:
    return np.stack([np.asarray(render(f)) for f in factors])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small models on a shared 2-core machine run far faster single-threaded (no OpenMP oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "toy"
    build(out, replace(BuildConfig(seed=0), **SMOKE), data_dir=REPO / "dataset", progress=False)
    return out


# ------------------------------------------------------------------------------------------ helpers
def test_pad_codes_right_pads_and_masks():
    ids, mask = pad_codes([torch.tensor([5, 6, 7]), torch.tensor([9])])
    assert ids.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]


def test_pad_codes_keeps_the_codes_device():
    ids, mask = pad_codes([torch.tensor([1, 2], device="meta"), torch.tensor([3], device="meta")])
    assert ids.device.type == "meta" and mask.device.type == "meta" and tuple(ids.shape) == (2, 2)


def test_visual_embeddings_start_from_what_codes_mean(smoke_dir):
    from pigeon_utils.toy.lmm import init_visual_embeddings, make_llama
    from pigeon_utils.toy.text import layout_for

    bb = load_toy_backbone(smoke_dir)
    table = bb.tokenizer.code_table()
    layout = layout_for(bb.text_tokenizer, bb.tokenizer.codebook_size)
    lmm = make_llama(layout.vocab_size, layout, hidden=32, layers=1, heads=2, intermediate=64)
    text_before = lmm.get_input_embeddings().weight[: layout.visual_offset].clone()
    init_visual_embeddings(lmm, layout, table, torch.Generator().manual_seed(0))
    w = lmm.get_input_embeddings().weight.detach()
    assert torch.equal(w[: layout.visual_offset], text_before)  # text ids untouched
    e = w[layout.visual_offset:]
    assert abs(e.std().item() - 0.02) < 1e-3
    e = torch.nn.functional.normalize(e, dim=1)
    pos = table["position"]
    same = (pos[:, None] == pos[None]) & (pos[:, None] >= 0) & ~torch.eye(len(pos), dtype=torch.bool)
    other = (pos[:, None] != pos[None]) & (pos[:, None] >= 0) & (pos[None] >= 0)
    cos = e @ e.T
    assert cos[same].mean() > cos[other].mean() + 0.1  # codes of one patch position start close


def test_load_backbone_dispatches_on_preset(tmp_path):
    with pytest.raises(CheckpointError):  # the lavit loader, on a folder without LaVIT's files
        load_backbone("lavit", tmp_path)
    with pytest.raises(ValueError, match="preset"):
        load_backbone("nope", tmp_path)


# ------------------------------------------------------------------------------------------ smoke build
def test_smoke_build_writes_every_file_and_loads(smoke_dir):
    for rel in REQUIRED_FILES:
        assert (smoke_dir / rel).is_file(), rel
    manifest = json.loads((smoke_dir / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["recipe"]["smoke"] is True
    assert set(manifest["figures"]) == {"clip_zero_shot", "round_trip", "caption_to_image", "in_context_copy"}
    assert 0.0 <= manifest["figures"]["in_context_copy"]["probability"] <= 1.0
    lmm = manifest["train_stats"]["lmm"]  # SMOKE runs every LMM phase: pre-training, then the copy phase
    assert lmm["steps"] == SMOKE["lmm_steps"] and set(lmm) == {"steps", "tokens", "loss", "copy"}
    assert manifest["command"].endswith(" --seed 0 --smoke")  # BuildConfig() + SMOKE: no other field differs
    copy = lmm["copy"]  # the copy phase checks its probe every lmm_copy_max_steps (2) steps here
    assert copy["alone"]["steps"] == SMOKE["lmm_copy_max_steps"] and len(copy["alone"]["checks"]) == 1
    assert copy["mixed"]["steps"] == SMOKE["lmm_copy_mix_steps"] and 0.0 <= copy["mixed"]["copy_probability"] <= 1
    bb = load_backbone("toy", smoke_dir)
    lay = bb.layout
    assert (lay.img_id, lay.emb_id, lay.visual_offset) == (len(bb.text_tokenizer) - 2, len(bb.text_tokenizer) - 1,
                                                           len(bb.text_tokenizer))
    assert lay.pad_id == bb.text_tokenizer.eos_token_id == 2
    assert bb.lmm.config.vocab_size == lay.vocab_size == lay.visual_offset + bb.tokenizer.codebook_size
    assert not any(t == bb.text_tokenizer.unk_token_id for t in bb.encode_text("a filled red star on a dots background"))


def test_smoke_backbone_shapes(smoke_dir):
    bb = load_toy_backbone(smoke_dir)
    ims = _images(ToyFactors("star", "red", "dots", "filled", size=36), ToyFactors("moon", "blue", "plain", "outline"),
                  ToyFactors("cross", "green", "grid", "filled", size=24, dx=5))
    tokens = bb.tokenizer.tokenize(ims)
    assert isinstance(tokens, VisualTokens) and len(tokens) == 3 and tokens.grid == (8, 8)
    assert len(set(tokens.counts.tolist())) > 1  # token counts vary with the image
    for codes, where in zip(tokens.codes, tokens.patch_index):
        assert len(codes) == len(where) and codes.dtype == torch.long
        assert bool(((codes >= 0) & (codes < bb.tokenizer.codebook_size)).all())
        assert where[0] == -1 and bool((where[1:].diff() > 0).all())  # image token, then raster order
    cond, pooled = bb.detokenizer.embed(tokens.codes)
    d = bb.detokenizer
    assert cond.shape == (3, 64, d.cond_dim) and pooled.shape == (3, d.pooled_dim)
    a = bb.decode_codes(tokens.codes, generator=torch.Generator().manual_seed(1))
    b = bb.decode_codes(tokens.codes, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 64, 64) and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b)  # deterministic given the generator
    clip = load_toy_clip(smoke_dir, bb.text_tokenizer)
    img, txt = clip.image_features(ims), clip.text_features(["a filled red star on a dots background"])
    assert img.shape[0] == 3 and img.shape[1] == txt.shape[1]
    assert torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)


def test_smoke_build_is_deterministic(smoke_dir, tmp_path):
    again = tmp_path / "again"
    build(again, replace(BuildConfig(seed=0), **SMOKE, figures=False), data_dir=REPO / "dataset", progress=False)
    first = json.loads((smoke_dir / "manifest.json").read_text())["files"]
    second = json.loads((again / "manifest.json").read_text())["files"]
    assert first == second


def _train_detokenizer(folder, images, features, weight: float, steps: int = 3):
    """A fresh small detokenizer + UNet on `folder`'s tokenizer and VAE, trained `steps` steps; returns it."""
    from pigeon_utils.toy.decoder import ToyPixelDecoder, make_scheduler, make_unet, train_pixel_decoder
    from pigeon_utils.toy.detokenizer import ToyDetokenizer

    bb = load_toy_backbone(folder)
    codes, mask = pad_codes(bb.tokenizer.tokenize(images).codes)
    torch.manual_seed(0)
    detok = ToyDetokenizer(bb.detokenizer.config)
    detok.set_code_table(bb.tokenizer.code_table())
    vae = bb.pixel_decoder.vae
    unet = make_unet(vae.config.latent_channels, detok.cond_dim, detok.pooled_dim, grid=bb.tokenizer.config.grid,
                     channels=(16, 32))
    decoder = ToyPixelDecoder(unet, make_scheduler(), vae, num_inference_steps=2)
    with torch.no_grad():
        latents = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    train_pixel_decoder(detok, decoder, codes, mask, latents, steps, 8, 1e-2, torch.Generator().manual_seed(0),
                        progress=False, features=features, feature_weight=weight)
    return detok


def test_detokenizer_feature_term_trains_the_detokenizer_only_when_weighted(smoke_dir):
    """The feature-reconstruction term (build's `detok_feature_weight`) adds a gradient to the detokenizer when its
    weight is > 0 and leaves training exactly as before at 0; features must have one row per training image.
    (What it does at full size is the bench's reference-embedding probe.)"""
    from pigeon_utils.toy.evaluate import fresh_images

    images, fs = fresh_images([(g, "red", "plain", "filled") for g in ("star", "heart")], 16, seed=0)
    features = torch.nn.functional.one_hot(torch.tensor([int(f["glyph"] == "star") for f in fs]), 2).float()
    plain = _train_detokenizer(smoke_dir, images, None, 0.0).state_dict()
    unused = _train_detokenizer(smoke_dir, images, features, 0.0).state_dict()
    weighted = _train_detokenizer(smoke_dir, images, features, 1.0).state_dict()
    assert all(torch.equal(plain[k], unused[k]) for k in plain)
    assert not torch.allclose(plain["in_proj.weight"], weighted["in_proj.weight"])
    with pytest.raises(ValueError, match="one row per training image"):
        _train_detokenizer(smoke_dir, images, features[:10], weight=1.0, steps=1)


def test_train_clip_channels_last_trains_and_saves_contiguous_weights(smoke_dir, tmp_path):
    """`channels_last` (the build's `clip_channels_last`) trains in channels-last layout and hands back weights in
    the default layout, which safetensors stores and which load back unchanged."""
    from pigeon_utils.toy import clip as toy_clip
    from pigeon_utils.toy.evaluate import fresh_images

    images, fs = fresh_images([(g, "red", "plain", "filled") for g in ("star", "heart")], 8, seed=0)
    captions = [ToyFactors(**f).caption() for f in fs]
    clip = load_toy_clip(smoke_dir)
    before = {k: v.clone() for k, v in clip.model.state_dict().items()}
    toy_clip.train_clip(clip, torch.from_numpy(images), captions, steps=2, batch=4, lr=1e-3,
                        gen=torch.Generator().manual_seed(0), progress=False, channels_last=True)
    trained = clip.model.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    assert all(t.is_contiguous() for t in trained.values())
    model_cfg = json.loads((smoke_dir / "clip" / "open_clip_config.json").read_text())["model_cfg"]
    clip.save_pretrained(tmp_path / "clip", model_cfg)
    back = toy_clip.ToyClip.from_pretrained(tmp_path / "clip", clip.text_tokenizer).model.state_dict()
    assert all(torch.equal(back[k], trained[k]) for k in back)


def test_render_many_in_worker_processes_draws_the_same_images():
    rng = np.random.default_rng(0)
    fs = [random_factors(rng, g, c, p, s) for g, c, p, s in
          [("circle", "red", "plain", "filled"), ("star", "blue", "dots", "outline"),
           ("heart", "green", "stripes", "outline")] * 700]  # above the size at which workers start
    serial = render_many(fs, workers=1)
    assert serial.shape == (2100, 64, 64, 3) and serial.dtype == np.uint8
    np.testing.assert_array_equal(render_many(fs, workers=2), serial)
    np.testing.assert_array_equal(serial[1], np.asarray(render(fs[1])))
    assert render_many([], workers=2).shape == (0, 64, 64, 3)


def test_linear_probe_accuracy_finds_a_linear_factor_and_not_noise():
    from pigeon_utils.toy.evaluate import linear_probe_accuracy

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(4, (800,), generator=g)
    noise = torch.randn(800, 6, generator=g)
    carried = noise.clone()
    carried[:, :4] += 3 * torch.nn.functional.one_hot(labels, 4)
    assert linear_probe_accuracy(carried, labels, n_train=600) > 0.95
    assert linear_probe_accuracy(noise, labels, n_train=600) < 0.4
    with pytest.raises(ValueError, match="n_train=800"):
        linear_probe_accuracy(noise, labels, n_train=800)


def test_reference_embedding_probe_reads_the_mean_detokenizer_output(smoke_dir):
    from pigeon_utils.toy.evaluate import fresh_images, reference_embedding_probe

    ims, fs = fresh_images([("star", c, "plain", "filled") for c in ("red", "blue")], 80, seed=0)
    probe = reference_embedding_probe(load_toy_backbone(smoke_dir), ims, fs, n_train=60)
    assert set(probe) == {"glyph", "colour", "pattern", "stroke"}
    assert probe["colour"] == 1.0  # the image token's colour reaches every slot, hence the mean


def test_missing_or_damaged_checkpoint_names_the_file(smoke_dir, tmp_path):
    broken = tmp_path / "toy"
    shutil.copytree(smoke_dir, broken)
    (broken / "detokenizer" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"detokenizer/model\.safetensors.*missing.*pigeon_utils\.toy\.build"):
        load_backbone("toy", broken)
    shutil.copy(smoke_dir / "detokenizer" / "model.safetensors", broken / "detokenizer" / "model.safetensors")
    unet = broken / "pixel_decoder" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors.*damaged"):
        load_backbone("toy", broken)
    with pytest.raises(CheckpointError, match=r"unet.*damaged"):
        load_toy_backbone(broken, check_hashes=False)
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone("toy", tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ grammar
def test_visual_grammar_keeps_positions_increasing(smoke_dir):
    bb = load_toy_backbone(smoke_dir)
    lay, proc = bb.layout, bb.visual_logits_processor()
    pos = bb.tokenizer.code_table()["position"]
    n_global = bb.tokenizer.config.n_global
    patch_at_10 = lay.visual_offset + int((pos == 10).nonzero()[0])
    ids = torch.tensor([[5, lay.img_id], [lay.img_id, lay.visual_offset], [lay.visual_offset, patch_at_10]])
    out = proc(ids, torch.zeros(3, lay.vocab_size))
    allowed = torch.isfinite(out)
    vis = slice(lay.visual_offset, None)
    # after [IMG]: only image tokens among visual ids, no [/IMG]
    assert allowed[0, vis].tolist() == (pos == -1).tolist() and not allowed[0, lay.emb_id]
    # after the image token: any patch token or [/IMG]
    assert allowed[1, vis].tolist() == (pos >= 0).tolist() and allowed[1, lay.emb_id]
    # after a patch at position 10: only later positions or [/IMG]
    assert allowed[2, vis].tolist() == (pos > 10).tolist() and allowed[2, lay.emb_id]
    assert bool(allowed[:, : lay.img_id].all())  # text ids are Pigeon's business
    assert n_global == int((pos == -1).sum())


# ------------------------------------------------------------------------------------------ shipped
def test_shipped_checkpoint_tokenizes_and_decodes():
    assert SHIPPED.is_dir(), f"{SHIPPED} missing: build it with python -m pigeon_utils.toy.build"
    bb = load_backbone("toy", SHIPPED)
    clip = load_toy_clip(SHIPPED, bb.text_tokenizer)
    truth = [ToyFactors("heart", "pink", "stripes", "filled", size=34), ToyFactors("star", "blue", "dots", "outline"),
             ToyFactors("square", "yellow", "grid", "filled", size=28, dx=-4),
             ToyFactors("moon", "green", "plain", "outline", size=36, dy=3)]
    tokens = bb.tokenizer.tokenize(_images(*truth))
    assert len(set(tokens.counts.tolist())) > 1
    images = bb.decode_codes(tokens.codes, generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 3, 64, 64)
    pred = clip.predict_factors(images)
    right = sum(p["glyph"] == t.glyph and p["colour"] == t.colour for p, t in zip(pred, truth))
    assert right >= 3, pred


@pytest.mark.parametrize("steps, pct", [(20, 0.05), (10, 0.1), (2, 0.05), (1600, 0.05), (550, 0.1)])
def test_one_cycle_runs_every_step_count_and_keeps_torch_schedule_elsewhere(steps, pct):
    """The build's schedules (VAE, CLIP, detokenizer + UNet) run for every step count: torch's OneCycleLR divides
    by zero when the warm-up ends at step 0 (20 steps at 0.05, 10 at 0.1); other counts keep torch's schedule."""
    from pigeon_utils.toy.decoder import one_cycle

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(lambda o: one_cycle(o, 1e-2, steps, pct))
    assert len(ours) == steps and all(np.isfinite(ours)) and max(ours) <= 1e-2 * (1 + 1e-9)
    if pct * steps != 1.0:
        assert ours == lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=steps,
                                                                           pct_start=pct))
    else:
        with pytest.raises(ZeroDivisionError):
            lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=steps, pct_start=pct))


def test_detokenizer_features_put_the_images_meaning_beside_its_embedding():
    """Each row is the unit image embedding next to the unit mean of the text embeddings of its glyph's semantics
    texts — equal for two images of one glyph, different across glyphs."""
    from pigeon_utils.toy.training_data import detokenizer_features
    from pigeon_utils.toy.data import semantics_texts

    class FakeClip:
        def image_features(self, images):
            return torch.tensor(images, dtype=torch.float32) * 3.0

        def text_features(self, texts):  # a deterministic vector per text
            return torch.stack([torch.randn(2, generator=torch.Generator().manual_seed(sum(map(ord, t))))
                                for t in texts])

    images = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    factors = [{"glyph": "heart"}, {"glyph": "heart"}, {"glyph": "star"}]
    clip = FakeClip()
    both = detokenizer_features(clip, images, factors)
    assert both.shape == (3, 5)
    assert torch.allclose(both[:, :3], torch.eye(3)) and torch.allclose(both[:, 3:].norm(dim=1), torch.ones(3))
    want = torch.nn.functional.normalize(clip.text_features(semantics_texts("heart")), dim=-1).mean(0)
    assert torch.allclose(both[0, 3:], want / want.norm()) and torch.equal(both[0, 3:], both[1, 3:])
    assert not torch.allclose(both[0, 3:], both[2, 3:])
