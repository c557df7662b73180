"""pigeon_utils.metrics / metrics_models: the evaluation of docs/algorithm.md §7 (CPU, no downloads).

FID against closed forms, SSIM / MS-SSIM against an independent numpy reference (2-D window, sliding windows) and
torchmetrics, the toy world end to end with its own CLIP, the real world's wiring with stand-in models, and the
errors for missing real-world weight files.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from pigeon_utils.metrics import (EVAL_SIZE, METRICS, fid_from_features, format_results, frechet_distance, ms_ssim,
                                  pixel_tensor, resize_images, ssim)
from pigeon_utils.metrics_models import TOY_UNAVAILABLE, Evaluator


# ------------------------------------------------------------------------------------------------- FID
def _exact_samples(rng, mu, cov, n):
    """n samples whose sample mean and covariance (N − 1) are exactly `mu` and `cov`."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mu + z @ np.linalg.cholesky(cov).T


def test_fid_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(0)
    assert fid_from_features(a := rng.standard_normal((300, 16)), a) == pytest.approx(0.0, abs=1e-9)
    few = rng.standard_normal((6, 64))  # N < D: singular covariance
    assert fid_from_features(few, few) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_features(torch.from_numpy(few).float(), torch.from_numpy(few).float()) == pytest.approx(0, abs=1e-5)


def test_fid_grows_with_a_mean_shift_by_exactly_its_squared_length():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((200, 8))
    shifts = [0.1, 0.5, 1.0, 3.0]
    fids = [fid_from_features(a, a + s * np.ones(8)) for s in shifts]
    assert fids == pytest.approx([8 * s * s for s in shifts], rel=1e-9)
    assert all(x < y for x, y in zip(fids, fids[1:]))


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(2)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))  # shared eigenbasis: tr √(Σ1Σ2) = Σ √(l1 l2)
    l1, l2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum()
    assert frechet_distance(mu1, q @ np.diag(l1) @ q.T, mu2, q @ np.diag(l2) @ q.T) == pytest.approx(want, rel=1e-10)
    # 2-d, non-commuting: tr √(Σ1Σ2) = √(tr Σ1Σ2 + 2 √(det Σ1 det Σ2))
    s1, s2 = np.array([[2.0, 0.6], [0.6, 1.0]]), np.array([[0.5, -0.3], [-0.3, 1.5]])
    assert not np.allclose(s1 @ s2, s2 @ s1)
    tr = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.5])
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-10)
    # and from features whose Gaussian fits are exactly those
    a, b = _exact_samples(rng, mu1, s1, 50), _exact_samples(rng, mu2, s2, 80)
    assert fid_from_features(a, b) == pytest.approx(want, rel=1e-9)


def test_fid_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(np.ones((1, 4)), np.ones((5, 4)))
    with pytest.raises(ValueError, match="one D"):
        fid_from_features(np.random.rand(5, 4), np.random.rand(5, 3))


# ------------------------------------------------------------------------------------------------- SSIM
def _ref_maps(x, y, data_range=255.0, size=11, sigma=1.5, k=(0.01, 0.03)):
    """Per channel: mean SSIM map and mean contrast-structure map, with an explicit 2-D Gaussian window over every
    fully inside position (numpy, float64)."""
    c = np.arange(size) - size // 2
    g = np.exp(-c ** 2 / (2 * sigma ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()

    def mean(z):  # [C, H, W] -> [C, H - size + 1, W - size + 1]
        return np.einsum("chwij,ij->chw", sliding_window_view(z, (size, size), axis=(1, 2)), win)

    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    mx, my = mean(x), mean(y)
    vx, vy, cxy = mean(x * x) - mx ** 2, mean(y * y) - my ** 2, mean(x * y) - mx * my
    cs = (2 * cxy + c2) / (vx + vy + c2)
    s = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs
    return s.mean((1, 2)), cs.mean((1, 2))


def _ref_pool(z):
    """2 × 2 mean; an odd side gets one zero on both ends first (counted in the mean)."""
    ph, pw = z.shape[1] % 2, z.shape[2] % 2
    z = np.pad(z, ((0, 0), (ph, ph), (pw, pw)))
    h, w = z.shape[1] // 2, z.shape[2] // 2
    return z[:, :2 * h, :2 * w].reshape(z.shape[0], h, 2, w, 2).mean((2, 4))


def _ref_ms_ssim(x, y, weights=(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)):
    out = np.ones(x.shape[0])
    for i, w in enumerate(weights):
        s, cs = _ref_maps(x, y)
        out *= np.maximum(s if i == len(weights) - 1 else cs, 0) ** w
        x, y = _ref_pool(x), _ref_pool(y)
    return out.mean()


@pytest.fixture(scope="module")
def image_pairs():
    """Fixed images: smooth random fields in [0, 255] and noisy versions of them (float64)."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.rand(2, 3, 24, 24, generator=g), size=(176, 168), mode="bicubic")
    a = (base.clamp(0, 1) * 255).double()
    b = (a + 25 * torch.randn(a.shape, generator=g, dtype=torch.float64)).clamp(0, 255)
    return a, b


def test_ssim_and_ms_ssim_of_identical_images_are_one(image_pairs):
    a = image_pairs[0]
    assert ssim(a[:1], a[:1]).item() == pytest.approx(1, abs=1e-12)
    f = a.float()
    assert ssim(f, f).tolist() == pytest.approx([1, 1], abs=1e-6)
    assert ms_ssim(f, f).tolist() == pytest.approx([1, 1], abs=1e-6)


def test_ssim_drops_with_noise(image_pairs):
    a = image_pairs[0][:1].float()
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(1))
    noisy = torch.cat([(a + sd * noise).clamp(0, 255) for sd in (2, 10, 40)])
    s, m = ssim(a.expand_as(noisy), noisy).tolist(), ms_ssim(a.expand_as(noisy), noisy).tolist()
    assert 1 > s[0] > s[1] > s[2] and 1 > m[0] > m[1] > m[2]


def test_ssim_and_ms_ssim_match_an_independent_reference(image_pairs):
    a, b = image_pairs
    x, y = a[0].numpy(), b[0].numpy()
    assert ssim(a[:1], b[:1]).item() == pytest.approx(_ref_maps(x, y)[0].mean(), abs=1e-10)
    assert ms_ssim(a[:1], b[:1]).item() == pytest.approx(_ref_ms_ssim(x, y), abs=1e-10)
    odd_a, odd_b = a[:1, :, :165, :163], b[:1, :, :165, :163]  # odd sides: padded 2 × 2 pooling
    assert ms_ssim(odd_a, odd_b).item() == pytest.approx(_ref_ms_ssim(odd_a[0].numpy(), odd_b[0].numpy()), abs=1e-10)
    # float32 (the paper's dtype) stays close to the float64 reference
    assert ssim(a.float(), b.float()).tolist() == pytest.approx(ssim(a, b).tolist(), abs=1e-4)


def test_ssim_matches_torchmetrics_on_the_unpadded_region(image_pairs):
    """torchmetrics averages over a reflection-padded border; cropped to the fully inside windows it is the paper's
    (pytorch_msssim's) SSIM."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    a, b = image_pairs
    _, full = tm_ssim(a, b, data_range=255.0, reduction="none", return_full_image=True)
    assert torch.allclose(ssim(a, b), full[..., 5:-5, 5:-5].flatten(1).mean(1), rtol=0, atol=1e-10)


def test_ms_ssim_needs_large_images():
    x = torch.rand(1, 3, 160, 200) * 255
    with pytest.raises(ValueError, match="above 160 px.*resize"):
        ms_ssim(x, x)
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, x[..., :100])


def test_resizing_is_the_papers_bilinear_512():
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (out,) = resize_images([img])
    assert EVAL_SIZE == 512 and out.size == (512, 512) and Evaluator("toy").size == 512
    t = pixel_tensor([out])
    assert t.shape == (1, 3, 512, 512) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 255


# ------------------------------------------------------------------------------------------------- toy world
@pytest.fixture(scope="module")
def toy():
    from pigeon_utils.data import open_dataset
    from pigeon_utils.paths import REPO_ROOT

    ds = open_dataset(REPO_ROOT / "dataset" / "toy-sticker", "sticker")
    return Evaluator.for_world("toy", size=176), ds, ds.samples("test")[:2]


def test_toy_world_reports_dino_and_lpips_unavailable_with_a_reason():
    avail = Evaluator("toy").availability()
    for key in ("dino_score", "hist_dino_score", "hist_lpips"):
        assert avail[key] == TOY_UNAVAILABLE[key] and "toy world has no" in avail[key]
    with pytest.raises(ValueError, match="toy world has no dino"):
        Evaluator("toy", dino=object())
    real = Evaluator("lavit").availability()
    assert "toy world's known image factors" in real["style_accuracy"]
    assert "DINOv2" in real["dino_score"] and all(real[k] for k in ("fid", "hist_lpips", "clip_score"))
    assert real["hist_ssim"] is None and real["hist_ms_ssim"] is None


def test_toy_evaluation_end_to_end(toy):
    from pigeon_utils.scoring import history_cis

    ev, ds, samples = toy
    targets = [ds.load_image(s.target) for s in samples]
    res = ev.evaluate_dataset(targets, ds, samples)  # generated = targets
    assert list(res) == list(METRICS)
    for key in ("dino_score", "hist_dino_score", "hist_lpips"):
        assert res[key] == {"available": False, "reason": TOY_UNAVAILABLE[key], "label": METRICS[key].label,
                            "group": METRICS[key].group}
    assert res["clip_image_score"]["per_sample"] == pytest.approx([100.0] * 2, abs=1e-3)
    assert res["fid"]["value"] == pytest.approx(0.0, abs=1e-6) and "toy CLIP" in res["fid"]["features"]
    for key in ("clip_score", "hist_clip_score", "hist_ssim", "hist_ms_ssim", "style_accuracy", "semantic_accuracy"):
        assert res[key]["available"] and len(res[key]["per_sample"]) == 2, key
    assert res["hist_ssim"]["size"] == 176 and np.shape(res["hist_ssim"]["per_pair"]) == (2, 5)
    g = ev.clip.generated_features(targets)
    h = torch.stack([ev.clip.image_features([ds.load_image(i) for i in s.history]) for s in samples])
    assert res["hist_clip_image_score"]["per_sample"] == pytest.approx(history_cis(g, h).tolist(), abs=1e-4)
    assert "unavailable: DINOv2-large is a real-world model" in format_results(res)

    # generated = the first history image: that pair is perfect, and the target scores drop
    res2 = ev.evaluate_dataset([ds.load_image(s.history[0]) for s in samples], ds, samples)
    for key, best in (("hist_ssim", 1.0), ("hist_ms_ssim", 1.0), ("hist_clip_image_score", 100.0)):
        assert np.asarray(res2[key]["per_pair"])[:, 0] == pytest.approx([best] * 2, abs=1e-4), key
        assert np.asarray(res2[key]["per_pair"])[:, 1:].max() < best
    assert res2["fid"]["value"] > 1e-3 and res2["clip_image_score"]["mean"] < 99.0


def test_target_and_history_features_are_computed_once_per_image_and_pixel_samples_cut(toy):
    """Several models on the same samples: the second call reuses the targets' and histories' features (same
    results as a fresh evaluator), and ``pixel_samples`` limits SSIM / MS-SSIM to the first samples."""
    ev, ds, samples = toy
    gen = [ds.load_image(s.history[1]) for s in samples]
    fresh = Evaluator("toy", clip=ev.clip, size=176).evaluate_dataset(gen, ds, samples)
    calls = []
    clip = ev.clip
    spy = Evaluator("toy", clip=clip, size=176, pixel_samples=1)
    spy.evaluate_dataset([ds.load_image(s.target) for s in samples], ds, samples)
    orig = clip.image_features
    clip.image_features = lambda ims: (calls.append(len(ims)), orig(ims))[1]
    try:
        again = spy.evaluate_dataset(gen, ds, samples)
    finally:
        clip.image_features = orig
    assert calls == []  # the ten history images' features came from the first call
    for key in ("hist_clip_image_score", "clip_image_score", "clip_score", "hist_clip_score"):
        assert again[key]["per_sample"] == pytest.approx(fresh[key]["per_sample"], abs=1e-4), key
    assert again["hist_ssim"]["samples"] == 1 and len(again["hist_ssim"]["per_sample"]) == 1
    assert again["hist_ssim"]["per_sample"] == pytest.approx(fresh["hist_ssim"]["per_sample"][:1], abs=1e-6)
    none = Evaluator("toy", clip=clip, size=176, pixel_samples=0).evaluate_dataset(gen, ds, samples)
    assert not none["hist_ms_ssim"]["available"] and "pixel_samples=0" in none["hist_ms_ssim"]["reason"]


# ------------------------------------------------------------------------------------------------- real world
class _Record:
    def __init__(self):
        self.sizes = []


class _FakeClip(_Record):
    def image_features(self, images):
        self.sizes += [im.size for im in images]
        return torch.stack([torch.from_numpy(np.asarray(im, np.float32).mean((0, 1))) + 1 for im in images])

    def text_features(self, texts):
        return torch.stack([torch.tensor([len(t), 1.0, 2.0]) for t in texts])


class _FakeDino(_FakeClip):
    pass


class _FakeLpips:
    def distance(self, a, b):
        assert 0 <= a.min() and a.max() <= 1
        return (a - b).abs().mean((1, 2, 3))


class _FakeInception(_Record):
    def features(self, images):
        self.sizes.append(tuple(images.shape[1:]))
        assert 0 <= images.min() and images.max() <= 1
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1)


def test_real_world_wiring_with_stand_in_models():
    """The real world's code path without weights: who sees which size, and every metric available."""
    from pigeon_utils.scoring import ClipScorer

    rng = np.random.default_rng(0)
    im = lambda s: rng.integers(0, 256, (s, s, 3), dtype=np.uint8)  # noqa: E731
    gen, tgt = [im(40), im(48), im(40)], [im(30), im(30), im(30)]
    hist = [[im(20), gen[0]], [im(20), im(24)], [gen[2], im(20)]]
    clip, dino, inc = _FakeClip(), _FakeDino(), _FakeInception()
    ev = Evaluator("lavit", ClipScorer(clip, 64, "fake"), dino=dino, lpips=_FakeLpips(), inception=inc, size=176,
                   batch_size=2)
    res = ev.evaluate(gen, tgt, hist, ["a", "bb", "ccc"], [["x", "yy"], ["zzz", "w"], ["v", "uu"]])
    assert all(res[k]["available"] for k in METRICS if k not in ("style_accuracy", "semantic_accuracy"))
    assert not res["style_accuracy"]["available"]
    # per chunk of 2 samples: generated and targets at generated_size, histories as they are
    assert clip.sizes == [(64, 64)] * 4 + [(20, 20), (40, 40), (20, 20), (24, 24)] + [(64, 64)] * 2 \
        + [(40, 40), (20, 20)]
    assert dino.sizes[:4] == [(176, 176)] * 2 + [(30, 30)] * 2  # generated at `size`, targets as they are
    assert inc.sizes == [(3, 176, 176)] * 4 and "Inception" in res["fid"]["features"]
    lp, ss = np.asarray(res["hist_lpips"]["per_pair"]), np.asarray(res["hist_ssim"]["per_pair"])
    assert lp[0, 1] == 0 and lp[2, 0] == 0 and ss[0, 1] == pytest.approx(1) and ss[2, 0] == pytest.approx(1)
    assert res["hist_lpips"]["mean"] == pytest.approx(lp.mean(1).mean())
    assert res["hist_dino_score"]["per_pair"][0][1] == pytest.approx(100.0, abs=0.05)  # g at 176 vs g at 40


def test_missing_real_world_weights_name_every_file(tmp_path, monkeypatch):
    from pigeon_utils.lavit.extractors import ExtractorWeightsError

    monkeypatch.setenv("PIGEON_EVAL_DIR", str(tmp_path))
    with pytest.raises(ExtractorWeightsError) as err:
        Evaluator.for_world("lavit")
    msg = str(err.value)
    for name in ("pt_inception-2015-12-05-6726825d.pth", "vgg16-397923af.pth", "dinov2-large", "open_clip",
                 str(tmp_path), "PIGEON_EVAL_DIR"):
        assert name in msg, name
    with pytest.raises(ExtractorWeightsError, match="dinov2-large.*config.json"):
        Evaluator.for_world("lavit", metrics=["dino_score"], eval_dir=tmp_path / "elsewhere")
    ev = Evaluator.for_world("lavit", metrics=["hist_ssim", "hist_ms_ssim"])  # nothing to load
    assert ev.availability()["clip_score"].startswith("not requested")
    with pytest.raises(ValueError, match="unknown metrics"):
        Evaluator.for_world("lavit", metrics=["inception_score"])
