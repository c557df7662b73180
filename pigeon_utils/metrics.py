"""The evaluation metrics of docs/algorithm.md §7 as plain functions: FID from features, SSIM / MS-SSIM, CLIP-style
cosine scores, and the table of metrics with their groups. :class:`pigeon_utils.metrics_models.Evaluator` runs them
on images with the world's models.

* **FID** — :func:`fid_from_features`: the Fréchet distance of two Gaussians fitted to two feature sets,
  ``|μ_a − μ_b|² + tr Σ_a + tr Σ_b − 2 tr (Σ_a^½ Σ_b Σ_a^½)^½``. The trace of the matrix square root is computed from
  symmetric eigen-decompositions in float64 (``Σ_a Σ_b`` and ``Σ_a^½ Σ_b Σ_a^½`` have the same eigenvalues), which
  stays real and exact for singular covariances (fewer samples than dimensions) where ``scipy.linalg.sqrtm`` needs
  pytorch-fid's ε-offset retry. The paper feeds pytorch-fid's Inception-V3 pool3 features (2048-d); the toy world
  feeds its toy-CLIP image embeddings (a different scale: toy FIDs compare with toy FIDs only).
* **SSIM / MS-SSIM** — :func:`ssim`, :func:`ms_ssim`: the paper's ``pytorch_msssim`` definitions (``ssim`` /
  ``ms_ssim`` with their defaults: 11-px Gaussian window of σ 1.5 applied without padding, K = (0.01, 0.03),
  ``data_range=255`` on [0, 255] floats; MS-SSIM over 5 scales with weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333),
  ReLU on each scale's contrast term and on the last scale's SSIM, product per colour channel, then the channel
  mean). They are written here in torch rather than taken from torchmetrics: torchmetrics averages the SSIM map over
  reflection-padded borders and multiplies the scales after averaging the channels, which moves MS-SSIM by up to
  0.07 on toy images (its SSIM agrees once the padded border is cropped; the tests check that). MS-SSIM needs both
  sides above 160 px (``pytorch_msssim``'s bound; torchmetrics' version needs ≥ 176): the paper resizes every image
  to 512 × 512 first, and so do we in both worlds — the toy's 64 × 64 images are resized *up* to 512 (bilinear)
  before SSIM and MS-SSIM, as the paper resizes every image, so toy SSIMs are of smoothed, upsampled images.
* **CLIP / DINO scores** — :func:`cosine_scores`, :func:`pair_cosine_scores`: 100 · cos of the two feature sets
  (unnormalised features are normalised here).

Images are resized as the paper's ``transforms.Resize((512, 512), BILINEAR)`` on PIL images does
(:func:`resize_images`, PIL bilinear).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pigeon_utils.scoring import mean_se

__all__ = ["EVAL_SIZE", "MS_SSIM_WEIGHTS", "METRICS", "MetricInfo", "gaussian_stats", "frechet_distance",
           "fid_from_features", "ssim", "ms_ssim", "cosine_scores", "pair_cosine_scores", "to_pil", "resize_images",
           "pixel_tensor", "summarize", "unavailable", "format_results"]

#: side every image is resized to before evaluation (docs/algorithm.md §7)
EVAL_SIZE = 512
#: ``pytorch_msssim``'s MS-SSIM scale weights (Wang et al. 2003)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


class MetricInfo(NamedTuple):
    """How one metric is reported: the paper's name, its group, what it compares, and its direction."""

    label: str
    group: str
    compares: str
    higher_is_better: bool


#: every metric of docs/algorithm.md §7 (the paper's names as labels), then the toy world's factor accuracies
METRICS: dict[str, MetricInfo] = {
    "fid": MetricInfo("FID", "fidelity", "generated set vs target set", False),
    "clip_score": MetricInfo("CLIP Score", "target consistency", "g vs semantics[t] (text)", True),
    "clip_image_score": MetricInfo("CLIP Image Score", "target consistency", "g vs t", True),
    "dino_score": MetricInfo("DINO Image Score", "target consistency", "g vs t", True),
    "hist_clip_score": MetricInfo("Hist CLIP Score", "history similarity", "g vs semantics[h_k] (text)", True),
    "hist_clip_image_score": MetricInfo("Hist CLIP Image Score", "history similarity",
                                        "g vs h_k (= the history CIS of docs/algorithm.md §6.1)", True),
    "hist_dino_score": MetricInfo("Hist DINO Image Score", "history similarity", "g vs h_k", True),
    "hist_lpips": MetricInfo("Hist LPIPS", "history similarity", "g vs h_k", False),
    "hist_ssim": MetricInfo("Hist SSIM", "history similarity", "g vs h_k", True),
    "hist_ms_ssim": MetricInfo("Hist MS-SSIM", "history similarity", "g vs h_k", True),
    "style_accuracy": MetricInfo("Style accuracy (toy)", "toy factors",
                                 "g's style factors vs the most frequent ones of h_1…h_5", True),
    "semantic_accuracy": MetricInfo("Semantic accuracy (toy)", "toy factors", "g's glyph vs t's glyph", True),
}


# ------------------------------------------------------------------------------------------------- FID
def _as_2d_float64(x, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected features [N, D], got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: features contain NaN or infinity")
    return a


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (``np.cov``, N − 1 denominator, as pytorch-fid) of features [N, D], N ≥ 2."""
    a = _as_2d_float64(features, "features")
    if len(a) < 2:
        raise ValueError(f"a Gaussian fit needs at least 2 feature vectors, got {len(a)}")
    return a.mean(0), np.atleast_2d(np.cov(a, rowvar=False))


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 − mu2|² + tr sigma1 + tr sigma2 − 2 tr (sigma1^½ sigma2 sigma1^½)^½`` in float64. Covariances are
    symmetrised; eigenvalues below 0 (rounding) count as 0, and a result below 0 from rounding is returned as 0."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"frechet_distance needs means [D] and covariances [D, D] of one D; got {mu1.shape}, "
                         f"{s1.shape}, {mu2.shape}, {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ ((s2 + s2.T) / 2) @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def fid_from_features(a, b) -> float:
    """FID of two feature sets [N_a, D] and [N_b, D] (numpy or torch): the Fréchet distance of their Gaussian fits
    (docs/algorithm.md §7). 0 for a set with itself; a shift c of every vector adds |c|²."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


# ------------------------------------------------------------------------------------------------- SSIM
def _check_pair(a: Tensor, b: Tensor, what: str) -> tuple[Tensor, Tensor]:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.dim() != 4 or a.shape != b.shape:
        raise ValueError(f"{what} needs two image batches [N, C, H, W] of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    dtype = a.dtype if a.dtype.is_floating_point else torch.float32
    return a.to(dtype), b.to(device=a.device, dtype=dtype)


def _gauss_1d(size: int, sigma: float, like: Tensor) -> Tensor:
    if size % 2 != 1 or size < 1:
        raise ValueError(f"the SSIM window size must be odd and positive, got {size}")
    c = torch.arange(size, dtype=torch.float64) - size // 2  # exact, then the inputs' dtype
    g = torch.exp(-(c ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).to(like.device, like.dtype)


def _band(n: int, win: Tensor) -> Tensor:
    """[n, n − k + 1] matrix whose column j holds the window at rows j … j + k − 1: ``x @ band`` is the valid 1-D
    convolution of the rows of ``x`` with the window."""
    k = win.numel()
    cols = torch.arange(n - k + 1, device=win.device)
    band = torch.zeros(n, n - k + 1, dtype=win.dtype, device=win.device)
    for i in range(k):
        band[cols + i, cols] = win[i]
    return band


def _blur(x: Tensor, win: Tensor) -> Tensor:
    """Separable Gaussian filter without padding (``pytorch_msssim.gaussian_filter``; a side shorter than the window is
    left unfiltered, as there). Each 1-D pass is a matrix product with a banded matrix: on a CPU about 2.5× faster
    than the grouped convolution it equals (to float rounding), which matters at the paper's 512 px."""
    if x.shape[3] >= win.numel():
        x = x @ _band(x.shape[3], win)
    if x.shape[2] >= win.numel():
        x = (x.transpose(2, 3) @ _band(x.shape[2], win)).transpose(2, 3)
    return x


def _ssim_cs(x: Tensor, y: Tensor, data_range: float, win: Tensor, k: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Per image and channel [N, C]: the mean SSIM and contrast-structure maps (``pytorch_msssim._ssim``)."""
    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    mu1, mu2 = _blur(x, win), _blur(y, win)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = _blur(x * x, win) - mu1_sq
    s2 = _blur(y * y, win) - mu2_sq
    s12 = _blur(x * y, win) - mu12
    cs_map = (2 * s12 + c2) / (s1 + s2 + c2)
    ssim_map = (2 * mu12 + c1) / (mu1_sq + mu2_sq + c1) * cs_map
    return ssim_map.flatten(2).mean(-1), cs_map.flatten(2).mean(-1)


def ssim(a: Tensor, b: Tensor, data_range: float = 255.0, win_size: int = 11, win_sigma: float = 1.5,
         k: tuple[float, float] = (0.01, 0.03)) -> Tensor:
    """SSIM [N] of image pairs [N, C, H, W] — ``pytorch_msssim.ssim(a, b, data_range=255, size_average=False)``:
    floats in [0, `data_range`], computed in the inputs' float dtype (integer inputs: float32)."""
    a, b = _check_pair(a, b, "ssim")
    s, _ = _ssim_cs(a, b, data_range, _gauss_1d(win_size, win_sigma, a), k)
    return s.mean(1)


def ms_ssim(a: Tensor, b: Tensor, data_range: float = 255.0, win_size: int = 11, win_sigma: float = 1.5,
            weights: Sequence[float] = MS_SSIM_WEIGHTS, k: tuple[float, float] = (0.01, 0.03)) -> Tensor:
    """MS-SSIM [N] of image pairs [N, C, H, W] — ``pytorch_msssim.ms_ssim(a, b, data_range=255,
    size_average=False)``. Both sides must exceed ``(win_size − 1) · 2^(scales − 1)`` (160 px for the defaults):
    resize first (the evaluation resizes to 512; toy 64 × 64 images are resized up)."""
    a, b = _check_pair(a, b, "ms_ssim")
    levels = len(weights)
    need = (win_size - 1) * 2 ** (levels - 1)
    if min(a.shape[-2:]) <= need:
        raise ValueError(f"ms_ssim with {levels} scales and an {win_size}-px window needs both image sides above "
                         f"{need} px, got {tuple(a.shape[-2:])}: resize the images first (the paper resizes to "
                         f"{EVAL_SIZE} × {EVAL_SIZE}; docs/algorithm.md §7)")
    win = _gauss_1d(win_size, win_sigma, a)
    w = torch.tensor(list(weights), dtype=a.dtype, device=a.device).view(-1, 1, 1)
    mcs = []
    for i in range(levels):
        s, cs = _ssim_cs(a, b, data_range, win, k)
        if i < levels - 1:
            mcs.append(torch.relu(cs))
            pad = (a.shape[2] % 2, a.shape[3] % 2)
            a, b = F.avg_pool2d(a, 2, padding=pad), F.avg_pool2d(b, 2, padding=pad)
    stacked = torch.stack(mcs + [torch.relu(s)])  # [levels, N, C]
    return torch.prod(stacked ** w, dim=0).mean(1)


# ------------------------------------------------------------------------------------------------- cosine scores
def cosine_scores(a, b) -> Tensor:
    """100 · cos of matching rows of `a` and `b` [N, D] (CLIP image / text score, DINO score)."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"cosine_scores needs two [N, D] feature sets of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    return 100.0 * (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)


def pair_cosine_scores(g, h) -> Tensor:
    """[N, K] 100 · cos(g_n, h_{n,k}) of features `g` [N, D] and `h` [N, K, D] (history scores per pair)."""
    g, h = torch.as_tensor(g).float(), torch.as_tensor(h).float()
    if g.dim() != 2 or h.dim() != 3 or h.shape[0] != g.shape[0] or h.shape[2] != g.shape[1]:
        raise ValueError(f"pair_cosine_scores needs g [N, D] and h [N, K, D], got {tuple(g.shape)} and "
                         f"{tuple(h.shape)}")
    return 100.0 * torch.einsum("nd,nkd->nk", F.normalize(g, dim=-1), F.normalize(h, dim=-1))


# ------------------------------------------------------------------------------------------------- images
def to_pil(image: Any):
    """An RGB PIL image from a PIL image or a uint8 [H, W, 3] array / tensor."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a PIL image or a uint8 [H, W, 3] array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def resize_images(images: Sequence[Any], size: Optional[int] = EVAL_SIZE) -> list:
    """RGB PIL images resized to `size` × `size` with PIL bilinear — the paper's ``transforms.Resize((512, 512),
    BILINEAR)`` on PIL images; ``size=None`` keeps them as they are."""
    from PIL import Image

    out = [to_pil(im) for im in images]
    if size is None:
        return out
    s = int(size)
    return [im if im.size == (s, s) else im.resize((s, s), Image.BILINEAR) for im in out]


def pixel_tensor(images: Sequence[Any]) -> Tensor:
    """float32 [N, 3, H, W] in [0, 255] of same-sized images (the paper's ``np.array(im, float32)`` for SSIM)."""
    arr = np.stack([np.asarray(to_pil(im), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------- results
def summarize(key: str, per_sample, per_pair=None, **extra) -> dict:
    """An available per-sample metric: its :data:`METRICS` entry, the per-sample values, their mean and standard
    error (:func:`pigeon_utils.scoring.mean_se`) and, for history metrics, the [N, K] values per pair."""
    values = [float(v) for v in np.asarray(per_sample, dtype=np.float64).reshape(-1)]
    info = METRICS[key]
    out = {"available": True, "label": info.label, "group": info.group, "compares": info.compares,
           "higher_is_better": info.higher_is_better, "per_sample": values, **mean_se(values)}
    if per_pair is not None:
        out["per_pair"] = np.asarray(per_pair, dtype=np.float64).tolist()
    out.update(extra)
    return out


def unavailable(key: str, reason: str) -> dict:
    """A metric that is not computed, with the reason — never a stand-in number."""
    info = METRICS[key]
    return {"available": False, "reason": reason, "label": info.label, "group": info.group}


def format_results(results: dict) -> str:
    """One line per metric: its label, then ``mean ± se``, FID's value, or why it is unavailable."""
    lines = []
    for key, r in results.items():
        label = r.get("label", key)
        if not r["available"]:
            lines.append(f"{label:<24} unavailable: {r['reason']}")
        elif "value" in r:
            lines.append(f"{label:<24} {r['value']:.4f}  (n = {r['n_generated']} vs {r['n_target']}; "
                         f"{r['features']})")
        else:
            lines.append(f"{label:<24} {r['mean']:.4f} ± {r['se']:.4f}  (n = {len(r['per_sample'])})")
    return "\n".join(lines)
