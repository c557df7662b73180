"""The personalization playground: your own history, reference and target text → images over α_r, with scores.

:class:`Playground` is an ipywidgets panel (notebook 08). Pick five history images and a reference from the
dataset's gallery or upload your own, edit the target text, choose the model (pre-trained, Stage 1, Stage 2 —
what the run directory holds, :class:`~pigeon_utils.generate.ModelBank`), slide α_h and α_r. It shows the image at
the chosen α_r, a strip over the whole α_r sweep and the image's history CIS / reference CS.

The whole sweep is generated once per (inputs, model, α_h) — :func:`~pigeon_utils.generate.generate_sweep` reads
the prompt prefix once for all ratios — and kept; moving α_r only picks from what is kept.
"""
from __future__ import annotations

import hashlib
import html
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pigeon_utils.generate import (ModelBank, generate_sweep, score_images, tokenize_images, user_batch,
                                   user_prompt_ids)
from pigeon_utils.generation import SamplingConfig
from pigeon_utils.images import image_from_bytes, load_image, to_rgb
from pigeon_utils.mask_view import png_bytes
from pigeon_utils.prompts import N_HISTORY

__all__ = ["Playground", "open_playground", "labelled_strip"]

FRAME = (230, 120, 20)


def _thumb(image: Image.Image, size: int) -> Image.Image:
    up = image.width < size
    return image.resize((size, size), Image.NEAREST if up else Image.BICUBIC)


def labelled_strip(images: Sequence[Image.Image], labels: Sequence[str], size: int, chosen: int = -1,
                   gap: int = 6) -> Image.Image:
    """Images side by side (each `size` px square) with a label (up to two lines) under each; image `chosen`
    framed."""
    h = size + 30
    strip = Image.new("RGB", (len(images) * (size + gap) + gap, h + gap), (255, 255, 255))
    d = ImageDraw.Draw(strip)
    for k, (im, label) in enumerate(zip(images, labels)):
        x = gap + k * (size + gap)
        strip.paste(_thumb(im, size), (x, gap // 2))
        if k == chosen:
            d.rectangle([x - 3, 0, x + size + 2, size + gap - 1], outline=FRAME, width=3)
        d.text((x + 2, size + gap // 2 + 2), label, fill=(0, 0, 0))
    return strip


class Playground:
    """Choose inputs, model, α_h and α_r; see the generated image, the sweep and the scores.

    ``playground.widget`` is the panel. :meth:`set` changes anything from code, as the controls would; what it
    shows: :attr:`history`, :attr:`reference` (PIL images), :attr:`image` (uint8 [H, W, 3] at the chosen α_r),
    :attr:`scores` (``{"history_cis", "reference_cs"}``, None without CLIP), :attr:`image_png`, :attr:`strip_png`,
    :attr:`sweep` (the kept result of the current inputs / model / α_h). `ref_mask_ratio`: the α_r shown first
    (the nearest of `ratios`). DOM contract (the browser test): panel
    ``pigeon-playground``; controls ``pigeon-pg-sample``, ``pigeon-pg-model``, ``pigeon-pg-hist-ratio``,
    ``pigeon-pg-ref-ratio``, ``pigeon-pg-text``; outputs ``pigeon-pg-image``, ``pigeon-pg-strip``,
    ``pigeon-pg-scores``, ``pigeon-pg-status``.
    """

    def __init__(self, bank: ModelBank, ds, *, clip=None, split: str = "test", n_samples: int = 8,
                 ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), ref_mask_ratio: float = 0.5,
                 hist_mask_ratio: Optional[float] = None, sampling: SamplingConfig | None = None, seed: int = 0,
                 decode_kw: Optional[dict] = None, sample: int = 0, size: int = 192):
        import ipywidgets as w

        self.bank, self.ds, self.clip, self.seed = bank, ds, clip, int(seed)
        self.backbone = bank.model.backbone
        self.sampling = sampling or SamplingConfig.for_preset(self.backbone.preset)
        self.decode_kw, self.size = dict(decode_kw or {}), int(size)
        self.ratios = [round(float(r), 6) for r in ratios]
        if not self.ratios or len({f"{r:.2f}" for r in self.ratios}) != len(self.ratios):
            raise ValueError(f"ratios must be distinct α_r values (to 2 decimals), got {list(ratios)}")
        self.samples = ds.samples(split)[: max(1, int(n_samples))]
        if not self.samples:
            raise ValueError(f"split {split!r} of {ds.root} has no samples for the gallery")
        self._images: dict = {}  # key -> (label, PIL image): dataset iids and uploads
        for s in self.samples:
            for i in s.iids:
                if i not in self._images:
                    self._images[i] = (f"{i}: {ds.target_info(i)}", None)
        self._cache: dict = {}   # (inputs, model, α_h) -> the generated sweep
        self._tokens: dict = {}  # inputs digest -> visual tokens of the six images
        self._hold = False
        opts = self._options()
        self.sample = w.Dropdown(options=[(f"#{k}: user {s.uid}, target {ds.target_info(s.target)}", k)
                                          for k, s in enumerate(self.samples)], value=int(sample),
                                 description="sample")
        self.slots = [w.Dropdown(options=opts, description=f"history {k + 1}") for k in range(N_HISTORY)]
        self.ref_slot = w.Dropdown(options=opts, description="reference")
        self.history_upload = w.FileUpload(accept="image/*", multiple=True, description="history files")
        self.reference_upload = w.FileUpload(accept="image/*", multiple=False, description="reference file")
        self.text = w.Text(description="target text", continuous_update=False, layout=w.Layout(width="420px"))
        self.info = w.Text(description="title" if ds.scenario == "movie" else "emotion", continuous_update=False)
        self.model = w.Dropdown(options=list(bank.choices), value=bank.newest, description="model")
        ah = bank.model.config.hist_mask_ratio if hist_mask_ratio is None else hist_mask_ratio
        self.hist_ratio = w.FloatSlider(value=ah, min=0.0, max=1.0, step=0.1, description="α_h",
                                        readout_format=".1f", continuous_update=False)
        self.ref_ratio = w.SelectionSlider(options=[(f"{r:.2f}", r) for r in self.ratios],
                                           value=min(self.ratios, key=lambda x: abs(x - ref_mask_ratio)),
                                           description="α_r",
                                           continuous_update=False)
        self.inputs_view, self.image_view, self.strip_view = (w.Image(format="png") for _ in range(3))
        self.scores_html, self.status = w.HTML(), w.HTML()
        for ctl, cls in ((self.sample, "sample"), (self.model, "model"), (self.hist_ratio, "hist-ratio"),
                         (self.ref_ratio, "ref-ratio"), (self.text, "text"), (self.image_view, "image"),
                         (self.strip_view, "strip"), (self.scores_html, "scores"), (self.status, "status"),
                         (self.history_upload, "history-upload"), (self.reference_upload, "reference-upload")):
            ctl.add_class(f"pigeon-pg-{cls}")
        self.widget = w.VBox([
            w.HBox([self.sample, self.model]), w.HBox(self.slots[:3]), w.HBox([*self.slots[3:], self.ref_slot]),
            w.HBox([self.history_upload, self.reference_upload]), w.HBox([self.text, self.info]), self.inputs_view,
            w.HBox([self.hist_ratio, self.ref_ratio]), self.status, w.HBox([self.image_view, self.scores_html]),
            self.strip_view])
        self.widget.add_class("pigeon-playground")
        self.history: list[Image.Image] = []
        self.reference: Optional[Image.Image] = None
        self.sources: list[str] = []
        self.sweep: Optional[dict] = None
        self.image: Optional[np.ndarray] = None
        self.scores: dict = {}
        self.image_png = self.strip_png = b""
        self.sample.observe(lambda c: self._guard(self._fill_from_sample), names="value")
        for ctl in (*self.slots, self.ref_slot, self.text, self.info):
            ctl.observe(lambda c: self._guard(self._inputs_changed), names="value")
        for ctl in (self.model, self.hist_ratio):
            ctl.observe(lambda c: self._guard(self._regenerate), names="value")
        self.ref_ratio.observe(lambda c: self._guard(self._show), names="value")
        self.history_upload.observe(lambda c: self._guard(self._from_upload, self.history_upload, True), names="value")
        self.reference_upload.observe(lambda c: self._guard(self._from_upload, self.reference_upload, False),
                                      names="value")
        self._fill_from_sample()

    # -- inputs ----------------------------------------------------------------------------------------------
    def _options(self) -> list:
        return [(label, key) for key, (label, _) in self._images.items()]

    def _ratio(self, r: float) -> float:
        for x in self.ratios:
            if abs(x - float(r)) < 5e-3:
                return x
        raise ValueError(f"ref_mask_ratio={r!r}: expected one of the playground's ratios {self.ratios}")

    def _pil(self, key) -> Image.Image:
        label, im = self._images[key]
        if im is None:
            im = to_rgb(self.ds.load_image(key))
            self._images[key] = (label, im)
        return im

    def _register(self, item, name: str):
        """A dataset iid stays as it is; an image, bytes or a path becomes a new gallery entry. Returns the key."""
        if isinstance(item, (int, np.integer)):
            if int(item) not in self._images:
                self._images[int(item)] = (f"{int(item)}: {self.ds.target_info(int(item))}", None)
            return int(item)
        if isinstance(item, Image.Image):
            im = to_rgb(item)
        elif isinstance(item, (bytes, bytearray, memoryview)):
            im = image_from_bytes(item, name)
        else:
            im, name = load_image(item), Path(item).name
        key = f"upload:{len(self._images)}"
        self._images[key] = (f"upload {len(self._images)}: {name}", im)
        return key

    def _refresh_options(self) -> None:
        """Offer every gallery entry in every slot, keeping each slot's choice (no callback runs)."""
        opts = self._options()
        held, self._hold = self._hold, True
        try:
            for ctl in (*self.slots, self.ref_slot):
                value = ctl.value
                ctl.options = opts
                ctl.value = value
        finally:
            self._hold = held

    def _fill_from_sample(self) -> None:
        self._assign_sample()
        self._inputs_changed()

    def _assign_sample(self) -> None:
        s = self.samples[self.sample.value]
        self._assign(list(s.history), s.target, self.ds.semantics[s.target], self.ds.target_info(s.target))

    def _assign(self, history: Optional[list], reference, text: Optional[str], info: Optional[str]) -> None:
        """Set the input controls without their callbacks (the caller regenerates once)."""
        held, self._hold = self._hold, True
        try:
            for ctl, key in zip(self.slots, history or []):
                ctl.value = key
            if reference is not None:
                self.ref_slot.value = reference
            if text is not None:
                self.text.value = text
            if info is not None:
                self.info.value = info
        finally:
            self._hold = held

    def _from_upload(self, upload, is_history: bool) -> None:
        files = [(f["name"], f["content"]) for f in upload.value]
        if not files:
            return
        if is_history and len(files) > N_HISTORY:
            raise ValueError(f"uploaded {len(files)} history images; at most {N_HISTORY} (they replace the first "
                             f"slots in name order)")
        keys = [self._register(bytes(data), name) for name, data in sorted(files)]
        self._refresh_options()
        held, self._hold = self._hold, True
        try:
            upload.value = ()  # taken: the same file can be uploaded again
        finally:
            self._hold = held
        if is_history:
            self._assign(keys + [c.value for c in self.slots[len(keys):]], None, None, None)
        else:
            self._assign(None, keys[0], None, None)
        self._inputs_changed()

    def _guard(self, fn, *args) -> None:
        """Run a control's callback; a bad input shows in the status line instead of a traceback."""
        if self._hold:
            return
        try:
            fn(*args)
        except (ValueError, FileNotFoundError) as e:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"

    def _inputs_changed(self) -> None:
        if self._hold:
            return
        self.history = [self._pil(c.value) for c in self.slots]
        self.reference = self._pil(self.ref_slot.value)
        self.sources = [self._images[c.value][0] for c in (*self.slots, self.ref_slot)]
        thumbs = labelled_strip([*self.history, self.reference],
                                [f"history {k + 1}" for k in range(N_HISTORY)] + ["reference"], self.size // 2)
        self.inputs_view.value = png_bytes(thumbs)
        self._regenerate()

    def _digest(self) -> str:
        h = hashlib.sha1()
        for im in (*self.history, self.reference):
            h.update(repr(im.size).encode())
            h.update(im.tobytes())
        return h.hexdigest()

    # -- generating and showing ------------------------------------------------------------------------------
    def _regenerate(self) -> None:
        """Generate the sweep of the current inputs / model / α_h unless it is kept, then show it."""
        if self._hold:
            return
        images, text, info = [*self.history, self.reference], self.text.value, self.info.value
        digest = self._digest()
        key = (digest, text, info, self.model.value, round(float(self.hist_ratio.value), 6))
        if key not in self._cache:
            self.status.value = f"generating {len(self.ratios)} images ({self.model.value}) …"
            prompt = user_prompt_ids(self.backbone, self.ds.scenario, text, info)
            if digest not in self._tokens:
                self._tokens[digest] = tokenize_images(self.backbone, images, self.seed)
            model = self.bank.use(self.model.value)
            batch = user_batch(self.backbone, images, prompt, self.seed, codes=self._tokens[digest])
            codes, gen = generate_sweep(model, batch, self.ratios, self.sampling, seed=self.seed,
                                        hist_mask_ratio=key[-1], **self.decode_kw)
            cis, cs = score_images(self.clip, gen, self.history, text) if self.clip is not None else (None, None)
            self._cache[key] = {"model": self.model.value, "hist_mask_ratio": key[-1], "ratios": list(self.ratios),
                                "codes": codes, "images": gen, "history_cis": cis, "reference_cs": cs}
        self.sweep = self._cache[key]
        self.status.value = ""
        self._show()

    def _show(self) -> None:
        if self.sweep is None:
            return
        j = self.ratios.index(self._ratio(self.ref_ratio.value))
        sw = self.sweep
        self.image = sw["images"][j]
        self.scores = {k: None if sw[k] is None else float(sw[k][j]) for k in ("history_cis", "reference_cs")}
        self.image_png = png_bytes(_thumb(Image.fromarray(self.image), self.size))
        self.image_view.value = self.image_png
        self.strip_png = png_bytes(self.sweep_image(chosen=j))
        self.strip_view.value = self.strip_png
        sc = self.scores
        score_text = ("scores unavailable (no CLIP weights)" if sc["history_cis"] is None else
                      f"history CIS <b>{sc['history_cis']:.1f}</b><br>reference CS <b>{sc['reference_cs']:.1f}</b>")
        self.scores_html.value = (f"<b>{sw['model']}</b><br>α_h = {sw['hist_mask_ratio']:.1f}, "
                                  f"α_r = {self.ratios[j]:.2f}<br>{len(sw['codes'][j])} visual tokens<br>"
                                  f"{score_text}")

    def sweep_image(self, chosen: int = -1) -> Image.Image:
        """The generated images over α_r side by side, each labelled with its α_r (``a_r``) and, when known, its
        history CIS / reference CS; image `chosen` framed."""
        sw = self.sweep
        labels = [f"a_r {r:.2f}" + ("" if sw["history_cis"] is None else  # PIL's default font has no α
                                    f"\nCIS {sw['history_cis'][k]:.1f} / CS {sw['reference_cs'][k]:.1f}")
                  for k, r in enumerate(sw["ratios"])]
        return labelled_strip([Image.fromarray(im) for im in sw["images"]], labels, self.size * 2 // 3, chosen)

    def table(self) -> str:
        """The sweep as text: per α_r the number of visual tokens and the scores."""
        sw = self.sweep
        rows = [f"model: {sw['model']}, α_h = {sw['hist_mask_ratio']:.1f}",
                f"{'α_r':>6} {'tokens':>7} {'history CIS':>12} {'reference CS':>13}"]
        for k, r in enumerate(sw["ratios"]):
            cis = "n/a" if sw["history_cis"] is None else f"{sw['history_cis'][k]:.2f}"
            cs = "n/a" if sw["reference_cs"] is None else f"{sw['reference_cs'][k]:.2f}"
            rows.append(f"{r:>6.2f} {len(sw['codes'][k]):>7d} {cis:>12} {cs:>13}")
        return "\n".join(rows)

    def set(self, sample: Optional[int] = None, history: Optional[Sequence] = None, reference=None,
            text: Optional[str] = None, info: Optional[str] = None, model: Optional[str] = None,
            hist_mask_ratio: Optional[float] = None, ref_mask_ratio: Optional[float] = None) -> None:
        """Change settings from code, as the controls would. `history` (five) and `reference` items: a dataset
        iid, a PIL image, an image file's bytes or a path. One sweep at most is generated, after every change;
        a bad value raises before anything changes (the controls show errors in the status line instead)."""
        if history is not None and len(history) != N_HISTORY:
            raise ValueError(f"history: expected {N_HISTORY} images, got {len(history)}")
        if model is not None and model not in self.bank.choices:
            raise ValueError(f"model {model!r}: expected one of {list(self.bank.choices)}")
        if sample is not None and not 0 <= int(sample) < len(self.samples):
            raise ValueError(f"sample={sample!r}: expected 0 … {len(self.samples) - 1}")
        if text is not None and not str(text).strip():
            raise ValueError("the target text is empty: describe the image to make, e.g. 'a sticker showing joy'")
        ar = None if ref_mask_ratio is None else self._ratio(ref_mask_ratio)
        hk = None if history is None else [self._register(x, f"history {k + 1}") for k, x in enumerate(history)]
        rk = None if reference is None else self._register(reference, "reference")
        self._refresh_options()
        held, self._hold = self._hold, True
        try:
            if sample is not None:
                self.sample.value = int(sample)
                self._assign_sample()
            self._assign(hk, rk, text, info)
            for ctl, v in ((self.model, model), (self.hist_ratio, hist_mask_ratio), (self.ref_ratio, ar)):
                if v is not None:
                    ctl.value = v
        finally:
            self._hold = held
        self._inputs_changed()


def open_playground(run, *, split: str = "test", n_samples: int = 8, sample: int = 0,
                    ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), ref_mask_ratio: float = 0.5,
                    hist_mask_ratio: Optional[float] = None, sampling: Optional[dict] = None,
                    num_inference_steps: Optional[int] = None, guidance_scale: Optional[float] = None,
                    model_dir=None, clip_preset: Optional[str] = None, clip_path=None,
                    size: int = 192) -> Playground:
    """The playground of a :class:`~pigeon_utils.config.RunConfig`: its backbone, dataset (the gallery), the
    models its run directory holds (and `model_dir`), its CLIP when available; rendered once for `sample`."""
    from pigeon_utils.config import pick_device
    from pigeon_utils.data import open_dataset
    from pigeon_utils.scoring import optional_clip
    from pigeon_utils.sweep import InferenceConfig
    from pigeon_utils.worlds import load_backbone

    backbone = load_backbone(run.preset, run.checkpoint_dir, device=pick_device(run.device))
    ds = open_dataset(run.data_dir, run.scenario)
    bank = ModelBank(run, backbone, model_dir=model_dir)
    clip, why = optional_clip(run, backbone.text_tokenizer, clip_preset=clip_preset, clip_path=clip_path,
                              device=backbone.lmm.device)
    if clip is None:
        print(f"CLIP unavailable, scores skipped:\n  {why}")
    inf = InferenceConfig.for_preset(run.preset, sampling=sampling, ref_mask_ratios=tuple(ratios),
                                     num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    return Playground(bank, ds, clip=clip, split=split, n_samples=n_samples, ratios=inf.ref_mask_ratios,
                      ref_mask_ratio=ref_mask_ratio, hist_mask_ratio=hist_mask_ratio, sampling=inf.sampling,
                      seed=run.seed, decode_kw=inf.decoder_kwargs(), sample=sample, size=size)
