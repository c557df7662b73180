"""The evaluation of docs/algorithm.md §7 on images, in both worlds: :class:`Evaluator` runs the formulas of
:mod:`pigeon_utils.metrics` with the world's models.

Per sample n: a generated image g_n, its target t_n, its history images h_{n,1…K} (K = 5 in the paper) and the
descriptions ``semantics[t_n]`` / ``semantics[h_{n,k}]``. As the paper's ``evaluate_pigeon.py``:

* every generated, target and history image is resized to 512 × 512 (PIL bilinear) before FID, CLIP Image Score,
  DINO (generated side), LPIPS, SSIM and MS-SSIM;
* CLIP: g and t go through the world's :class:`~pigeon_utils.scoring.ClipScorer` resize (``generated_size``: 512 in
  the real world, the toy's own 64 in the toy); history images are scored from the originals (the paper's stored
  features, docs/algorithm.md §6.1 and §8.26), so **Hist CLIP Image Score** is §6.1's history CIS;
* DINO: g at 512 against t and h_k as they are (the paper's stored ``all_dino_feats`` of the originals);
* FID: the set of generated images against the set of targets — Inception-V3 pool3 features in the real world,
  toy-CLIP image embeddings in the toy (a toy-only scale, labelled as such in the result);
* history metrics average the K pairs of a sample; a metric's mean over samples is then the paper's mean over all
  N · K pairs.

The toy world computes toy-CLIP scores, FID on toy-CLIP features, SSIM and MS-SSIM (its 64 × 64 images resized up to
512, as the paper resizes every image; MS-SSIM needs more than 160 px) and, given the known factors, the toy's style and
semantic accuracies (:mod:`pigeon_utils.toy.scoring`). DINO and LPIPS are real-world models: the toy reports them
as unavailable with the reason, never a stand-in number. The real world loads every model from local files
(:mod:`pigeon_utils.lavit.extractors`); a missing file raises
:class:`~pigeon_utils.lavit.extractors.ExtractorWeightsError` naming it and where to put it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from pigeon_utils.metrics import (EVAL_SIZE, METRICS, cosine_scores, fid_from_features, ms_ssim,
                                  pair_cosine_scores, pixel_tensor, resize_images, ssim, summarize, to_pil,
                                  unavailable)

__all__ = ["Evaluator", "MODEL_METRICS", "TOY_UNAVAILABLE"]

#: which loaded model each metric needs (SSIM / MS-SSIM need none); the toy's FID and accuracies use its CLIP
MODEL_METRICS: dict[str, tuple[str, ...]] = {
    "clip": ("clip_score", "clip_image_score", "hist_clip_score", "hist_clip_image_score"),
    "dino": ("dino_score", "hist_dino_score"),
    "lpips": ("hist_lpips",),
    "inception": ("fid",),
}
_NO_DINO = "DINOv2-large is a real-world model; the toy world has no DINO (docs/algorithm.md §7)"
#: metrics the toy world cannot honestly compute, with the reason
TOY_UNAVAILABLE: dict[str, str] = {
    "dino_score": _NO_DINO,
    "hist_dino_score": _NO_DINO,
    "hist_lpips": "LPIPS-VGG is a real-world model (ImageNet VGG16 features); the toy world has no VGG "
                  "(docs/algorithm.md §7)",
}
_REAL_NO_FACTORS = "style / semantic accuracy read the toy world's known image factors; real images have none"
_TOY_FID = "toy CLIP image embeddings (not Inception-V3: comparable with other toy FIDs only)"
_REAL_FID = "Inception-V3 pool3 (2048-d), pytorch-fid's FID weights"
_MODEL_NAMES = {"clip": "CLIP", "dino": "DINOv2-large extractor", "lpips": "LPIPS-VGG model",
                "inception": "FID Inception-V3"}


def _chunks(n: int, size: int) -> Iterable[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


@dataclass
class Evaluator:
    """The metrics of docs/algorithm.md §7 for one world (``"toy"`` or ``"lavit"``).

    ``clip``: a :class:`~pigeon_utils.scoring.ClipScorer`; ``dino`` / ``lpips`` / ``inception``: models with the
    interfaces of :mod:`pigeon_utils.lavit.extractors` (``image_features(pil_images)``, ``distance(a, b)`` on [0, 1]
    images, ``features(images)`` on [0, 1] images) — real world only. A metric whose model is None is reported
    unavailable, with ``skipped[model]`` (or a default) as the reason. ``size``: the side images are resized to
    (512, the paper's); ``batch_size``: samples per chunk (each with K image pairs for LPIPS / SSIM); ``device``:
    where SSIM / MS-SSIM run (at 512 px they are the evaluation's heaviest step on a CPU); ``pixel_samples``: compute
    the pixel metrics (LPIPS, SSIM, MS-SSIM) on the first N samples only (None: all; their results say how many).
    :meth:`for_world` loads everything from local files.
    """

    world: str
    clip: Any = None
    dino: Any = None
    lpips: Any = None
    inception: Any = None
    size: int = EVAL_SIZE
    batch_size: int = 4
    device: Any = "cpu"
    skipped: dict[str, str] = field(default_factory=dict)
    pixel_samples: Optional[int] = None
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (kind, key) → features

    def __post_init__(self):
        from pigeon_utils.worlds import world

        world(self.world)  # validates the name
        if self.world == "toy":
            given = [m for m in ("dino", "lpips", "inception") if getattr(self, m) is not None]
            if given:
                raise ValueError(f"the toy world has no {', '.join(given)}: its FID uses toy-CLIP features and DINO / "
                                 f"LPIPS are reported unavailable (docs/algorithm.md §7)")

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def for_world(cls, preset: str, checkpoint_dir: Path | str | None = None, *,
                  metrics: Optional[Sequence[str]] = None, eval_dir: Path | str | None = None,
                  text_tokenizer=None, device="cpu", size: int = EVAL_SIZE, batch_size: int = 4,
                  pixel_samples: Optional[int] = None) -> "Evaluator":
        """The world's evaluator with its models loaded from local files.

        ``toy``: the toy CLIP from `checkpoint_dir` (default: the world's ``checkpoints/toy``). ``lavit``: open_clip
        ViT-H-14, DINOv2-large, LPIPS-VGG and the FID Inception-V3 from `eval_dir` (default ``$PIGEON_EVAL_DIR`` or
        ``checkpoints/eval``) — only those that the `metrics` asked for (default: all of :data:`METRICS`). Every
        missing file is named at once in one :class:`~pigeon_utils.lavit.extractors.ExtractorWeightsError` (what to
        download and where to put it); a missing optional package raises ImportError naming the ``eval`` extra."""
        from pigeon_utils.paths import REPO_ROOT
        from pigeon_utils.scoring import load_clip
        from pigeon_utils.worlds import world

        w = world(preset)
        wanted = set(METRICS) if metrics is None else set(metrics)
        unknown = wanted - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}: expected some of {list(METRICS)}")
        needed = {m for m, keys in MODEL_METRICS.items() if wanted & set(keys)}
        skipped = {m: f"not requested (metrics={sorted(wanted)})" for m in MODEL_METRICS if m not in needed}
        if preset == "toy":
            ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else REPO_ROOT / w.checkpoint_dir
            toy_clip = wanted & {"fid", "style_accuracy", "semantic_accuracy", *MODEL_METRICS["clip"]}
            clip = load_clip("toy", ckpt, text_tokenizer=text_tokenizer, device=device) if toy_clip else None
            return cls("toy", clip, size=size, batch_size=batch_size, device=device,
                       skipped={"clip": skipped["clip"]} if clip is None else {}, pixel_samples=pixel_samples)
        models = _load_real_models(needed, eval_dir, device)
        return cls(preset, size=size, batch_size=batch_size, device=device, skipped=skipped,
                   pixel_samples=pixel_samples, **models)

    # ------------------------------------------------------------------------------------------ availability
    def _missing(self, model: str) -> str:
        return self.skipped.get(model, f"no {_MODEL_NAMES[model]} was given (Evaluator({model}=...) or "
                                       f"Evaluator.for_world)")

    def availability(self) -> dict[str, Optional[str]]:
        """Per metric: None when it can be computed with the models at hand, else the reason it cannot
        (inputs can add reasons: no texts, no factors, fewer than 2 images for FID)."""
        out: dict[str, Optional[str]] = {k: None for k in METRICS}
        if self.world == "toy":
            out.update(TOY_UNAVAILABLE)
            if self.clip is None:
                for k in (*MODEL_METRICS["clip"], "fid", "style_accuracy", "semantic_accuracy"):
                    out[k] = self._missing("clip")
            elif not hasattr(self.clip.model, "predict_factors"):
                out["style_accuracy"] = out["semantic_accuracy"] = "this CLIP cannot read toy factors"
            return out
        out["style_accuracy"] = out["semantic_accuracy"] = _REAL_NO_FACTORS
        for model, keys in MODEL_METRICS.items():
            if getattr(self, model) is None:
                out.update({k: self._missing(model) for k in keys})
        return out

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, generated: Sequence, targets: Sequence, histories: Sequence[Sequence],
                 target_texts: Optional[Sequence[str]] = None, history_texts: Optional[Sequence[Sequence[str]]] = None,
                 *, target_factors: Optional[Sequence[dict]] = None,
                 history_factors: Optional[Sequence[Sequence[dict]]] = None, progress: bool = False,
                 target_keys: Optional[Sequence] = None, history_keys: Optional[Sequence[Sequence]] = None) -> dict:
        """Every metric of :data:`pigeon_utils.metrics.METRICS` for N samples: `generated` / `targets` (PIL images
        or uint8 [H, W, 3] arrays), `histories` (N lists of K images), `target_texts` (``semantics[t]``),
        `history_texts` (N lists of K ``semantics[h_k]``); the toy's `target_factors` / `history_factors` (factor
        dicts) give its style / semantic accuracies. Returns ``{metric: result}``: per-sample metrics with
        ``per_sample``, ``mean``, ``se`` (and ``per_pair`` [N, K] for history metrics), FID with ``value`` and the
        ``features`` it used, and unavailable ones as ``{"available": False, "reason": ...}``. `target_keys` /
        `history_keys` (ids of the target images and of each sample's history images) let the features of those
        images be computed once and reused by later calls on the same samples."""
        n = len(generated)
        if n == 0 or len(targets) != n or len(histories) != n:
            raise ValueError(f"evaluate needs N ≥ 1 generated images with as many targets and history lists; got "
                             f"{n}, {len(targets)}, {len(histories)}")
        ks = {len(h) for h in histories}
        if len(ks) != 1 or 0 in ks:
            raise ValueError(f"every sample needs the same number (≥ 1) of history images, got {sorted(ks)}")
        k = ks.pop()
        for name, v, shape in (("target_texts", target_texts, None), ("history_texts", history_texts, k),
                               ("target_factors", target_factors, None), ("history_factors", history_factors, k)):
            if v is not None and (len(v) != n or (shape is not None and any(len(x) != shape for x in v))):
                raise ValueError(f"{name} must have one entry per sample" + (f", {shape} each" if shape else ""))
        todo = self.availability()
        keys = (target_keys, history_keys) if target_keys is not None and history_keys is not None else None
        feats = self._run(generated, targets, histories, k, todo, progress, keys)
        res = {key: unavailable(key, reason) for key, reason in todo.items() if reason is not None}

        if self.clip is not None:
            g, t, h = feats["clip_g"], feats["clip_t"], feats["clip_h"]
            res["clip_image_score"] = summarize("clip_image_score", cosine_scores(g, t))
            hp = pair_cosine_scores(g, h)
            res["hist_clip_image_score"] = summarize("hist_clip_image_score", hp.mean(1), hp)
            if target_texts is None:
                res["clip_score"] = unavailable("clip_score", "no target texts were given (target_texts=...)")
            else:
                tt = self._cached("clip_tt", target_keys, list(target_texts), self.clip.text_features)
                res["clip_score"] = summarize("clip_score", cosine_scores(g, tt))
            if history_texts is None:
                res["hist_clip_score"] = unavailable("hist_clip_score",
                                                     "no history texts were given (history_texts=...)")
            else:
                hk = None if history_keys is None else [key for ks in history_keys for key in ks]
                ht = self._cached("clip_ht", hk, [s for hs in history_texts for s in hs],
                                  self.clip.text_features).view(n, k, -1)
                hp = pair_cosine_scores(g, ht)
                res["hist_clip_score"] = summarize("hist_clip_score", hp.mean(1), hp)
        if todo["dino_score"] is None:
            res["dino_score"] = summarize("dino_score", cosine_scores(feats["dino_g"], feats["dino_t"]))
            hp = pair_cosine_scores(feats["dino_g"], feats["dino_h"])
            res["hist_dino_score"] = summarize("hist_dino_score", hp.mean(1), hp)
        for key in ("hist_lpips", "hist_ssim", "hist_ms_ssim"):
            if todo[key] is None and not feats.get(key):
                res[key] = unavailable(key, f"pixel_samples={self.pixel_samples}: no sample got pixel metrics")
            elif todo[key] is None:
                hp = torch.cat(feats[key]).view(-1, k)
                res[key] = summarize(key, hp.mean(1), hp, size=self.size, samples=len(hp))
        if todo["fid"] is None:
            res["fid"] = self._fid(feats, n)
        if todo["style_accuracy"] is None:
            res.update(self._toy_accuracies(generated, target_factors, history_factors))
        return {key: res[key] for key in METRICS}

    def evaluate_dataset(self, generated: Sequence, ds, samples: Sequence, progress: bool = False) -> dict:
        """:meth:`evaluate` for `samples` of a :class:`~pigeon_utils.data.PigeonData` (anything with ``.history``
        and ``.target`` image ids), `generated` one image per sample: targets, histories, their ``semantics`` and,
        in the toy, their factors come from `ds`."""
        hist = [list(s.history) for s in samples]
        facts = getattr(ds, "factors", None)
        return self.evaluate(generated, [ds.load_image(s.target) for s in samples],
                             [[ds.load_image(i) for i in h] for h in hist],
                             [ds.semantics[s.target] for s in samples],
                             [[ds.semantics[i] for i in h] for h in hist],
                             target_factors=None if facts is None else [facts[s.target] for s in samples],
                             history_factors=None if facts is None else [[facts[i] for i in h] for h in hist],
                             progress=progress, target_keys=[(id(ds), s.target) for s in samples],
                             history_keys=[[(id(ds), i) for i in h] for h in hist])

    # ------------------------------------------------------------------------------------------ internals
    def _cached(self, kind: str, keys: Optional[Sequence], images: Sequence, fn) -> Tensor:
        """``fn(images)`` [n, D], its rows remembered by ``(kind, key)`` (no keys: computed every time)."""
        if keys is None:
            return fn(images)
        memo = self._memo
        miss = [j for j, key in enumerate(keys) if (kind, key) not in memo]
        if miss:
            for j, f in zip(miss, fn([images[j] for j in miss])):
                memo[(kind, keys[j])] = f
        return torch.stack([memo[(kind, key)] for key in keys])

    def _run(self, generated, targets, histories, k: int, todo: dict, progress: bool,
             keys: Optional[tuple] = None) -> dict[str, Any]:
        """Features and pair values, chunk by chunk of samples (512-px images are made per chunk only); `keys`:
        ``(target keys, history keys)`` for :meth:`_cached`."""
        from tqdm.auto import tqdm

        acc: dict[str, list] = {}

        def add(name, value):
            acc.setdefault(name, []).append(value)

        pixels = [key for key in ("hist_lpips", "hist_ssim", "hist_ms_ssim") if todo[key] is None]
        use_inception = todo["fid"] is None and self.inception is not None
        dino = todo["dino_score"] is None
        n_pix = len(generated) if self.pixel_samples is None else min(len(generated), self.pixel_samples)
        for sl in tqdm(list(_chunks(len(generated), self.batch_size)), desc="evaluating", disable=not progress):
            gen = [to_pil(im) for im in generated[sl]]
            tgt = [to_pil(im) for im in targets[sl]]
            hist = [to_pil(im) for hs in histories[sl] for im in hs]
            tk = None if keys is None else list(keys[0][sl])
            hk = None if keys is None else [key for ks in keys[1][sl] for key in ks]
            if self.clip is not None:
                add("clip_g", self.clip.generated_features(gen))
                # the paper resizes the targets too; the history images are the originals (§6.1)
                add("clip_t", self._cached("clip_t", tk, tgt, self.clip.generated_features))
                add("clip_h", self._cached("clip_h", hk, hist, self.clip.image_features).view(len(gen), k, -1))
            m = max(0, min(sl.stop, n_pix) - sl.start)  # samples of this chunk that get pixel metrics
            gen_s = resize_images(gen, self.size) if ((pixels and m) or dino or use_inception) else None
            if dino:
                add("dino_g", self.dino.image_features(gen_s))
                add("dino_t", self._cached("dino_t", tk, tgt, self.dino.image_features))
                add("dino_h", self._cached("dino_h", hk, hist, self.dino.image_features).view(len(gen), k, -1))
            if use_inception:
                add("inc_g", self.inception.features(pixel_tensor(gen_s) / 255.0))
                add("inc_t", self._cached("inc_t", tk, tgt,
                                          lambda ims: self.inception.features(pixel_tensor(resize_images(ims, self.size))
                                                                              / 255.0)))
            if pixels and m:
                a = pixel_tensor(gen_s[:m]).repeat_interleave(k, dim=0).to(self.device)  # g_n paired with h_{n,1…K}
                b = pixel_tensor(resize_images(hist[:m * k], self.size)).to(self.device)
                if "hist_ssim" in pixels:
                    add("hist_ssim", ssim(a, b, data_range=255.0).cpu())
                if "hist_ms_ssim" in pixels:
                    add("hist_ms_ssim", ms_ssim(a, b, data_range=255.0).cpu())
                if "hist_lpips" in pixels:
                    add("hist_lpips", torch.as_tensor(self.lpips.distance(a / 255.0, b / 255.0)).reshape(-1).cpu())
        out: dict[str, Any] = {}
        for name, parts in acc.items():
            out[name] = parts if name.startswith("hist_") else torch.cat([torch.as_tensor(p) for p in parts])
        return out

    def _fid(self, feats: dict, n: int) -> dict:
        if n < 2:
            return unavailable("fid", f"FID fits a Gaussian to each set and needs at least 2 samples, got {n}")
        g, t, what = ((feats["clip_g"], feats["clip_t"], _TOY_FID) if self.world == "toy"
                      else (feats["inc_g"], feats["inc_t"], _REAL_FID))
        info = METRICS["fid"]
        return {"available": True, "label": info.label, "group": info.group, "compares": info.compares,
                "higher_is_better": info.higher_is_better, "value": fid_from_features(g, t), "n_generated": len(g),
                "n_target": len(t), "features": what, "feature_dim": int(g.shape[1])}

    def _toy_accuracies(self, generated, target_factors, history_factors) -> dict:
        if target_factors is None or history_factors is None:
            why = "no toy factors were given (target_factors= and history_factors=, or evaluate_dataset)"
            return {"style_accuracy": unavailable("style_accuracy", why),
                    "semantic_accuracy": unavailable("semantic_accuracy", why)}
        from pigeon_utils.toy.scoring import history_style_accuracy

        pred = self.clip.model.predict_factors([to_pil(im) for im in generated])
        style = [history_style_accuracy([p], [h]) for p, h in zip(pred, history_factors)]
        semantic = [float(p["glyph"] == t["glyph"]) for p, t in zip(pred, target_factors)]
        return {"style_accuracy": summarize("style_accuracy", style),
                "semantic_accuracy": summarize("semantic_accuracy", semantic)}


def _load_real_models(needed: set[str], eval_dir, device) -> dict[str, Any]:
    """The real world's models named in `needed`, from local files; all missing files are reported together."""
    from pigeon_utils.lavit import extractors as ex
    from pigeon_utils.scoring import load_clip

    base = Path(eval_dir).expanduser() if eval_dir is not None else None

    def at(rel: str):
        return None if base is None else base / rel

    loaders = {  # cheapest first
        "inception": lambda: ex.load_fid_inception(at(ex.INCEPTION_FILE), device=device),
        "lpips": lambda: ex.load_lpips_vgg(at(ex.VGG16_FILE), device=device),
        "dino": lambda: ex.load_dinov2(at(ex.DINO_DIR), device=device),
        "clip": lambda: load_clip("lavit", clip_path=at(ex.OPEN_CLIP_DIR), device=device),
    }
    models, weight_errors, import_errors = {}, [], []
    for name, load in loaders.items():
        if name not in needed:
            continue
        try:
            models[name] = load()
        except ex.ExtractorWeightsError as e:
            weight_errors.append(str(e))
        except ImportError as e:
            import_errors.append(str(e))
    problems = weight_errors + import_errors
    if weight_errors:
        raise ex.ExtractorWeightsError("the real world's evaluation models could not be loaded:\n- "
                                       + "\n- ".join(problems))
    if import_errors:
        raise ImportError("the real world's evaluation models could not be loaded:\n- " + "\n- ".join(problems))
    return models
