"""Personalized images from a person's own pictures: five history images, a reference, a target text.

The same path as the dataset's (:func:`pigeon_utils.batching.prompt_batch` → :func:`~pigeon_utils.generation.
generate_tokens` → :func:`~pigeon_utils.generation.decode_images`), fed from PIL images instead of dataset ids:

* :func:`user_prompt_ids` — the scenario's instruction prompt around the target text (docs/algorithm.md §1.3);
* :func:`user_batch` — the six images tokenized (a stochastic tokenizer from one seeded generator per image) and
  assembled by :class:`~pigeon_utils.batching.PigeonCollator` into one inference prompt (sample index 0);
* :func:`generate_sweep` — every α_r in one pass (the prompt prefix read once), decoded in one call;
* :func:`score_images` — history CIS and reference CS of the images (:mod:`pigeon_utils.scoring`);
* :class:`ModelBank` — the models a run directory holds (pre-trained, Stage 1, Stage 2) on one backbone;
* :func:`run_generate` — ``python -m pigeon_utils generate``: one PNG per α_r and ``record.json``, written into
  a temporary folder and swapped in whole.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from pigeon_utils.backbone import to_uint8
from pigeon_utils.batching import ImageTokenCache, PigeonCollator
from pigeon_utils.generation import SamplingConfig, decode_images, generate_tokens
from pigeon_utils.model import PigeonBatch, PigeonModel
from pigeon_utils.prompts import N_HISTORY, build_prompt_text, encode_prompt, segment_prompt

__all__ = ["PRETRAINED", "RECORD_FILE", "user_prompt_ids", "tokenize_images", "user_batch", "generate_sweep",
           "score_images", "ModelBank", "image_name", "run_generate"]

#: the label of the pre-trained model (as :func:`pigeon_utils.checkpoints.newest_model` names it)
PRETRAINED = "pre-trained (no Stage 1)"
RECORD_FILE = "record.json"
RECORD_VERSION = 1
USER_INDEX = 0  # the sample index a user's inputs take (it seeds their mask noise and sampling)


# ------------------------------------------------------------------------------------------------- inputs
def user_prompt_ids(backbone, scenario: str, text: str, info: Optional[str] = None,
                    history_titles: Optional[Sequence[str]] = None) -> list[int]:
    """The encoded instruction prompt for a target described by `text` (its semantics). `info`: the target's
    emotion (sticker) or title (movie), default `text`; `history_titles` (movie): default five empty titles."""
    if not str(text).strip():
        raise ValueError("the target text is empty: describe the image to make, e.g. 'a sticker showing joy'")
    info = text if info is None or not str(info).strip() else info
    titles = list(history_titles) if history_titles is not None else ([""] * N_HISTORY if scenario == "movie"
                                                                      else None)
    prompt = build_prompt_text(scenario, str(info), str(text), history_titles=titles)
    return encode_prompt(segment_prompt(prompt), backbone.encode_text, backbone.layout)


class _Images:
    """A user's images as a dataset for :class:`~pigeon_utils.batching.ImageTokenCache`: image k is ``images[k]``."""

    def __init__(self, images: Sequence):
        self.images = list(images)

    def load_image(self, k: int):
        return self.images[int(k)]


def tokenize_images(backbone, images: Sequence, seed: int) -> list[Tensor]:
    """Visual tokens (code ids, CPU) of `images`, as :class:`~pigeon_utils.batching.ImageTokenCache` tokenizes a
    dataset's: a stochastic tokenizer draws image k from the generator of ``image_seed(seed, k)``."""
    return ImageTokenCache(_Images(images), backbone.tokenizer, cache=False, seed=seed).codes(range(len(images)))


class _Codes:
    """A fixed token table with :class:`~pigeon_utils.batching.ImageTokenCache`'s ``codes(iids)``."""

    def __init__(self, codes: Sequence[Tensor]):
        self.table = list(codes)

    def codes(self, iids: Sequence[int]) -> list[Tensor]:
        return [self.table[int(i)] for i in iids]


def user_batch(backbone, images: Sequence, prompt_ids: Sequence[int], seed: int,
               codes: Optional[Sequence[Tensor]] = None) -> PigeonBatch:
    """The inference batch of one user sample: `images` = five history images then the reference, `prompt_ids`
    from :func:`user_prompt_ids`; `codes` (their visual tokens) when already known. Mask noise from ``(seed, 0)``."""
    if len(images) != N_HISTORY + 1:
        raise ValueError(f"expected {N_HISTORY} history images and a reference ({N_HISTORY + 1} images), got "
                         f"{len(images)}")
    codes = tokenize_images(backbone, images, seed) if codes is None else codes
    item = {"index": USER_INDEX, "iids": tuple(range(N_HISTORY + 1)), "prompt_ids": list(prompt_ids)}
    return PigeonCollator(_Codes(codes), backbone.layout, seed, train=False)([item])


@torch.no_grad()
def generate_sweep(model: PigeonModel, batch: PigeonBatch, ratios: Sequence[float],
                   sampling: SamplingConfig | None = None, *, seed: int = 0,
                   hist_mask_ratio: Optional[float] = None, **decode_kw) -> tuple[list[Tensor], np.ndarray]:
    """One image per α_r of `ratios` for the one sample of `batch`: ``(codes [R], uint8 images [R, H, W, 3])``.
    All ratios share one prompt prefix (:func:`~pigeon_utils.generation.generate_tokens`) and one decoder call."""
    batch = batch.to(model.device)
    codes = generate_tokens(model, batch, [float(r) for r in ratios], sampling, seed=seed,
                            hist_mask_ratio=hist_mask_ratio)
    images = to_uint8(decode_images(model, codes, batch.index.tolist(), seed, **decode_kw))
    return list(codes[0]), images


def score_images(clip, images, history: Sequence, text: str) -> tuple[np.ndarray, np.ndarray]:
    """History CIS and reference CS [R] of generated `images` against the five `history` images and `text`."""
    from pigeon_utils.scoring import history_cis, reference_cs

    g = clip.generated_features(list(images))
    h = clip.image_features(list(history))
    t = clip.text_features([text])
    cis = history_cis(g, h[None].expand(len(g), -1, -1))
    cs = reference_cs(g, t.expand(len(g), -1))
    return cis.numpy().astype(np.float64), cs.numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------- models
class ModelBank:
    """The models of a run directory on one backbone: the pre-trained one, Stage 1 / Stage 2 when the run holds
    them, and `model_dir` (one of our model folders). One :class:`PigeonModel` is built (with the newest folder's
    configuration; the pre-trained weights seeded as :func:`~pigeon_utils.sft.pretrained_model` does) and
    :meth:`use` swaps the trained weights in — the backbone's LMM holds one LoRA. ``choices``: label → folder
    (None: pre-trained), oldest first."""

    def __init__(self, run, backbone, model_dir: Path | str | None = None):
        from pigeon_utils.checkpoints import MODEL_CONFIG_FILE, STAGES, read_model_config
        from pigeon_utils.sft import SFTConfig, pretrained_model

        self.choices: dict[str, Optional[Path]] = {PRETRAINED: None}
        for label, rel in reversed(STAGES):
            if (run.run_dir / rel / MODEL_CONFIG_FILE).is_file():
                self.choices[label] = run.run_dir / rel
        if model_dir is not None:
            read_model_config(model_dir)  # ours only: a clear error otherwise
            self.choices[f"model of {Path(model_dir).name}"] = Path(model_dir)
        sft = SFTConfig.for_preset(run.preset)
        folders = [f for f in self.choices.values() if f is not None]
        if folders:
            sft.model = read_model_config(folders[-1])
        self.model = pretrained_model(run, sft, backbone=backbone).eval()
        self._initial = {k: {n: t.detach().clone() for n, t in sd.items()}
                         for k, sd in self.model.trainable_state().items()}
        self.label = PRETRAINED

    @property
    def newest(self) -> str:
        return list(self.choices)[-1]

    def use(self, label: str) -> PigeonModel:
        """The model `label` (a key of :attr:`choices`), its weights loaded into the one model."""
        from pigeon_utils.checkpoints import read_model_config

        if label not in self.choices:
            raise ValueError(f"model {label!r}: expected one of {list(self.choices)}")
        if label != self.label:
            folder = self.choices[label]
            if folder is None:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(self.model.lmm, self._initial["lora"])
                self.model.adapter.load_state_dict(self._initial["adapter"])
                if self.model.mask_generator is not None:
                    self.model.mask_generator.load_state_dict(self._initial["mask_generator"])
            else:
                cfg = read_model_config(folder)
                if cfg != self.model.config:
                    raise ValueError(f"{folder}: its model configuration differs from the playground's model "
                                     f"({cfg} vs {self.model.config}); pass it as model_dir, whose configuration the "
                                     f"playground's model then takes")
                self.model.load_trained(folder)
            self.label = label
        return self.model.eval()


# ------------------------------------------------------------------------------------------------- the command
def image_name(ratio: float) -> str:
    """The file of the image at α_r = `ratio`: ``alpha_r_0.50.png``."""
    return f"alpha_r_{float(ratio):.2f}.png"


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is an existing file; expected a folder (new, or one this command wrote)")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD_FILE).is_file():
        raise ValueError(f"--out {out}: a folder that is not empty and holds no {RECORD_FILE}; not replacing it "
                         f"(choose a new folder)")


def run_generate(history: Sequence[Path | str], reference: Path | str, text: str, out: Path | str, *,
                 info: Optional[str] = None, scenario: str = "sticker",
                 ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), hist_mask_ratio: Optional[float] = None,
                 run_dir: Path | str | None = None, model: Path | str | None = None,
                 stage1_dir: Path | str | None = None, preset: str = "toy", checkpoint_dir: Path | str | None = None,
                 seed: int = 0, device: str = "auto", num_beams: Optional[int] = None,
                 max_new_tokens: Optional[int] = None, min_new_tokens: Optional[int] = None,
                 num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                 clip_preset: Optional[str] = None, clip_path: Path | str | None = None) -> dict:
    """``python -m pigeon_utils generate``: one image per α_r from the given files; returns the record.

    Every input is checked before a model is loaded (five history images — or a folder, whose first five images in
    name order are taken —, readable files, `out` not a file). The model: `model` (ours or the authors'
    checkpoint, :func:`~pigeon_utils.checkpoints.newest_model`), else the newest of `run_dir` (default
    ``runs/<preset>-<scenario>``), else the pre-trained one — the record names which. `out` receives
    ``alpha_r_<r>.png`` per ratio and ``record.json`` (inputs, settings, seed, visual tokens, scores, model), all
    at once: written into a temporary folder beside it, then swapped in (:func:`~pigeon_utils.atomic.atomic_dir`).
    """
    from PIL import Image

    from pigeon_utils.atomic import atomic_dir
    from pigeon_utils.checkpoints import newest_model
    from pigeon_utils.config import pick_device, resolve
    from pigeon_utils.images import history_paths, load_image
    from pigeon_utils.scoring import optional_clip
    from pigeon_utils.sweep import InferenceConfig
    from pigeon_utils.worlds import load_backbone

    out = Path(out)
    _check_out(out)
    hist_files = history_paths(history, N_HISTORY)
    files = [*hist_files, Path(reference)]
    images = [load_image(p) for p in files]
    inf = InferenceConfig.for_preset(preset, ref_mask_ratios=tuple(ratios), seed=seed, hist_mask_ratio=hist_mask_ratio,
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                     sampling=dict(num_beams=num_beams, max_new_tokens=max_new_tokens,
                                                   min_new_tokens=min_new_tokens))
    if run_dir is not None and not Path(run_dir).is_dir():
        raise ValueError(f"--run-dir {run_dir}: not a folder; expected a run directory (runs/<run>)")
    run = resolve(preset=preset, scenario=scenario, run_dir=run_dir, checkpoint_dir=checkpoint_dir, seed=seed,
                  device=device)
    backbone = load_backbone(run.preset, run.checkpoint_dir, device=pick_device(run.device))
    prompt = user_prompt_ids(backbone, scenario, text, info)
    net, label, folder = newest_model(run, backbone, model_dir=model, stage1_dir=stage1_dir)
    codes, gen = generate_sweep(net, user_batch(backbone, images, prompt, seed), inf.ref_mask_ratios, inf.sampling,
                                seed=seed, hist_mask_ratio=inf.hist_mask_ratio, **inf.decoder_kwargs())
    clip, why = optional_clip(run, backbone.text_tokenizer, clip_preset=clip_preset, clip_path=clip_path,
                              device=backbone.lmm.device)
    cis, cs = score_images(clip, gen, images[:N_HISTORY], text) if clip is not None else (None, None)
    record = {
        "version": RECORD_VERSION,
        "inputs": {"history": [str(p.resolve()) for p in hist_files], "reference": str(Path(reference).resolve()),
                   "text": text, "info": info, "scenario": scenario},
        "settings": {"preset": run.preset, "checkpoint_dir": str(run.checkpoint_dir),
                     **{k: v for k, v in inf.to_dict().items() if k not in ("batch_size", "seed")}},
        "seed": int(seed),
        "model": {"label": label, "folder": str(folder) if folder else None, "run_dir": str(run.run_dir)},
        "clip": clip.name if clip is not None else f"unavailable: {why}",
        "images": [{"ref_mask_ratio": r, "path": image_name(r), "codes": c.tolist(),
                    "history_cis": None if cis is None else float(cis[j]),
                    "reference_cs": None if cs is None else float(cs[j])}
                   for j, (r, c) in enumerate(zip(inf.ref_mask_ratios, codes))],
    }

    def write(tmp: Path) -> None:
        for r, img in zip(inf.ref_mask_ratios, gen):
            Image.fromarray(img).save(tmp / image_name(r), format="PNG")
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1))

    atomic_dir(out, write)
    return record
