"""The α_r sweep (docs/algorithm.md §5.3) and its files: one image per (sample, α_r) for a split.

The paper runs one full inference process per α_r ∈ {0.0, 0.1, …, 1.0}; :func:`run_sweep` generates all ratios of
a batch of samples in one pass (:func:`~pigeon_utils.generation.generate_tokens`: the prompt prefix once per
sample), decodes them in one pixel-decoder call per batch (:func:`~pigeon_utils.generation.decode_images`), writes
``<out_dir>/<α_r>/<index>_u<uid>_t<target>.png`` and records every finished image in ``<out_dir>/index.json``.
Every file is written under a temporary name and renamed, the index is rewritten after each sample, and a re-run
skips samples already in the index — an interrupted sweep resumes where it stopped. Batches are fixed (samples
0…B−1, B…2B−1, …), so a batch cut short is computed again with the same samples and its remaining images are those
of an uninterrupted run to the last bit.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from pigeon_utils.atomic import atomic_write
from pigeon_utils.backbone import to_uint8
from pigeon_utils.batching import ImageTokenCache, prompt_batch
from pigeon_utils.generation import SamplingConfig, decode_images, generate_tokens
from pigeon_utils.model import PigeonModel

__all__ = ["PAPER_REF_MASK_RATIOS", "InferenceConfig", "SweepResult", "ratio_key", "run_sweep", "load_index",
           "index_table", "finished_entries", "load_image", "sweep_folder", "first_samples",
           "keep_counts", "tokens_per_ratio"]

#: α_r values of the paper's sweep (run_inf.sh)
PAPER_REF_MASK_RATIOS = tuple(round(0.1 * i, 1) for i in range(11))
INDEX_FILE = "index.json"
INDEX_VERSION = 1


# ------------------------------------------------------------------------------------------------- config
@dataclass
class InferenceConfig:
    """One α_r sweep: the ratios (α_r), α_h (None: the model's), samples per LMM batch (rows = ``batch_size`` ×
    number of ratios), the sampling settings, the pixel decoder's steps / guidance (None: the world's defaults —
    LaVIT: DDIM 25 steps, guidance 7) and the seed every random draw derives from."""

    ref_mask_ratios: tuple[float, ...] = PAPER_REF_MASK_RATIOS
    hist_mask_ratio: Optional[float] = None
    batch_size: int = 4
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_inference_steps: Optional[int] = None
    guidance_scale: Optional[float] = None
    seed: int = 123

    def __post_init__(self):
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        self.ref_mask_ratios = tuple(float(r) for r in self.ref_mask_ratios)
        if not self.ref_mask_ratios:
            raise ValueError("ref_mask_ratios must hold at least one α_r")
        bad = [r for r in self.ref_mask_ratios if not (0.0 <= r <= 1.0)]
        if bad:
            raise ValueError(f"ref_mask_ratios must lie in [0, 1], got {bad}")
        keys = [ratio_key(r) for r in self.ref_mask_ratios]
        if len(set(keys)) != len(keys):
            raise ValueError(f"ref_mask_ratios has duplicates (to 2 decimals): {list(self.ref_mask_ratios)}")
        if self.hist_mask_ratio is not None and not (0.0 <= self.hist_mask_ratio <= 1.0):
            raise ValueError(f"hist_mask_ratio must be None or lie in [0, 1], got {self.hist_mask_ratio!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")

    @classmethod
    def for_preset(cls, preset: str, sampling: Optional[dict] = None, **overrides) -> "InferenceConfig":
        """The world's sampling settings and decoder steps (:data:`pigeon_utils.worlds.WORLDS`), with the
        `overrides` that are not None."""
        from pigeon_utils.worlds import world

        w = world(preset)
        base = {"num_inference_steps": w.sweep_decoder_steps, "ref_mask_ratios": w.sweep_ratios,
                "batch_size": w.sweep_batch_size}
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(sampling=SamplingConfig.for_preset(preset, **(sampling or {})),
                   **{k: v for k, v in {**base, **given}.items() if v is not None})

    def decoder_kwargs(self) -> dict:
        """The pixel decoder's steps / guidance that are set (None: the decoder's own defaults)."""
        return {k: v for k, v in (("num_inference_steps", self.num_inference_steps),
                                  ("guidance_scale", self.guidance_scale)) if v is not None}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ref_mask_ratios"] = list(self.ref_mask_ratios)
        return d


def ratio_key(ratio: float) -> str:
    """The folder / index name of α_r: two decimals (``0.30``)."""
    return f"{float(ratio):.2f}"


# ------------------------------------------------------------------------------------------------- files
def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def _save_index(index: dict, folder: Path, name: str = INDEX_FILE) -> None:
    data = json.dumps(index, indent=None, separators=(",", ":")).encode()
    atomic_write(folder / name, lambda f: f.write(data))


def load_index(folder: Path | str, name: str = INDEX_FILE) -> dict:
    """``<folder>/index.json`` of a sweep (see :func:`run_sweep`); a missing or damaged file names itself."""
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sweep index here (run_sweep writes it)")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: damaged sweep index ({e})") from None
    if index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path}: index version {index.get('version')!r}, expected {INDEX_VERSION}")
    return index


def load_image(folder: Path | str, rel: str) -> np.ndarray:
    """A generated image of a sweep as uint8 [H, W, 3]."""
    from PIL import Image

    with Image.open(Path(folder) / rel) as im:
        return np.asarray(im.convert("RGB"))


def index_table(index: dict) -> tuple[list[int], list[str]]:
    """The finished samples (split indices, sorted) and the ratio keys of a sweep index."""
    ratios = [ratio_key(r) for r in index["config"]["ref_mask_ratios"]]
    return sorted(int(k) for k in index["samples"]), ratios


def finished_entries(index: dict, folder: Path | str) -> tuple[list[int], list[str], list[dict]]:
    """A sweep index's finished samples (split indices, sorted), its ratio keys and the samples' entries; raises
    when no sample is finished."""
    indices, keys = index_table(index)
    if not indices:
        raise ValueError(f"{folder}: the sweep index has no finished samples to score")
    return indices, keys, [index["samples"][str(k)] for k in indices]


def sweep_folder(root: Path | str, model_key: str, split: str, cfg: InferenceConfig) -> Path:
    """Where a run keeps the sweep of one model over one split: ``<root>/sweeps/<model_key>/<split>-<tag>``, the tag a
    hash of the settings. Notebooks 05, 06 and 07 sweep into these folders, so a sample one of them generated is
    found finished by the next (same model, split and settings) instead of generated again."""
    import hashlib

    tag = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return Path(root) / "sweeps" / model_key / f"{split}-{tag}"


def first_samples(index: dict, n: Optional[int]) -> dict:
    """The index restricted to its samples with split index below `n` (None: all) — a shared folder may hold more
    samples than a caller asked for."""
    if n is None:
        return index
    return {**index, "samples": {k: e for k, e in index["samples"].items() if int(k) < n}}


# ------------------------------------------------------------------------------------------------- sweep
@dataclass
class SweepResult:
    """What :func:`run_sweep` did: the index (see there), its folder, samples generated now / found finished,
    and the seconds spent generating tokens and decoding images."""

    index: dict
    out_dir: Path
    generated: int
    skipped: int
    token_seconds: float
    decode_seconds: float


def _shard_name(rank: int) -> str:
    return f"index.part-{rank}.json"


def _read_finished(out_dir: Path, conf: dict, split: str) -> dict:
    """The finished samples recorded in `out_dir`: ``index.json`` and the shard indexes an interrupted
    multi-process sweep left; a file written with other settings is a ValueError naming it and what differs."""
    samples: dict = {}
    for path in [out_dir / INDEX_FILE] + sorted(out_dir.glob(_shard_name("*"))):
        if not path.is_file():
            continue
        old = load_index(out_dir, path.name)
        if old["config"] != conf or old["split"] != split:
            diff = sorted(k for k in set(conf) | set(old["config"]) if conf.get(k) != old["config"].get(k))
            raise ValueError(f"{path}: written with other settings (differs in {diff or ['split']}); "
                             f"use another folder or resume=False to start over")
        samples.update(old["samples"])
    return samples


def run_sweep(model: PigeonModel, ds, split: str, out_dir: Path | str, cfg: InferenceConfig, *,
              max_samples: Optional[int] = None, model_label: str = "", resume: bool = True,
              progress: bool = True, interrupt_after: Optional[int] = None) -> SweepResult:
    """Generate one image per (sample, α_r) for the first `max_samples` samples of `split` (docs/algorithm.md §5).

    Files under `out_dir` (e.g. ``run_dir/inference/test``): ``<α_r>/<index>_u<uid>_t<target>.png`` and
    ``index.json`` = ``{"version", "split", "model", "config", "samples": {index: {"uid", "gid", "history",
    "target", "images": {α_r: {"path", "codes"}}}}}`` (paths relative to `out_dir`, codes = the generated code ids,
    which notebook 04 turns into preference pairs). A sample enters the index only when all its images are written.

    Several processes (``accelerate launch``, ``accelerate.notebook_launcher`` or ``torchrun``, one model each) share
    the work: process p takes the batches p, p + P, p + 2P, … and records its samples in ``index.part-<p>.json``;
    at the end the main process merges them into ``index.json``. Every image is the one a single process makes.

    ``resume``: skip samples already recorded (the settings must equal `cfg`, else a ValueError says what differs;
    a batch with some samples finished is computed again, only its unfinished samples written); False starts the
    index over. ``interrupt_after``: stop after this many samples of this call (what a killed run leaves behind;
    used by the tests).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    out_dir = Path(out_dir)
    conf = cfg.to_dict()
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.rglob(".*.tmp*"):  # temporary files of a run killed mid-write
            stale.unlink()
    state.wait_for_everyone()
    index = {"version": INDEX_VERSION, "split": split, "model": model_label, "config": conf, "samples": {}}
    if resume:
        index["samples"] = _read_finished(out_dir, conf, split)
    state.wait_for_everyone()  # every process has read the shards before any is rewritten
    own = {**index, "samples": {}} if world > 1 else index  # what this process records
    own_name = _shard_name(rank) if world > 1 else INDEX_FILE
    samples = ds.samples(split)[:max_samples]
    todo = {k for k in range(len(samples)) if str(k) not in index["samples"]
            or not all((out_dir / im["path"]).is_file() for im in index["samples"][str(k)]["images"].values())}
    skipped = len(samples) - len(todo)
    # fixed batches (0…B−1, B…2B−1, …): a resumed sweep computes a batch with the same samples as an uninterrupted
    # one, so its tokens and pixels are the same to the last bit; a batch whose samples are all finished is skipped
    size = cfg.batch_size
    batches = [list(range(k0, min(k0 + size, len(samples)))) for k0 in range(0, len(samples), size)]
    batches = [chunk for chunk in batches if todo.intersection(chunk)][rank::world]
    model.eval()
    backbone = model.backbone
    tokens = ImageTokenCache(ds, backbone.tokenizer, seed=cfg.seed)
    ratios = cfg.ref_mask_ratios
    keys = [ratio_key(r) for r in ratios]
    dec_kw = cfg.decoder_kwargs()
    t_tok = t_dec = 0.0
    generated = 0
    mine = sum(len(todo.intersection(chunk)) for chunk in batches)
    bar = tqdm(total=mine, desc=f"α_r sweep ({split}, {len(ratios)} ratios)",
               disable=not (progress and state.is_main_process))
    for chunk in batches:
        t0 = time.perf_counter()
        batch = prompt_batch(ds, [samples[k] for k in chunk], chunk, backbone, tokens, cfg.seed).to(model.device)
        codes = generate_tokens(model, batch, ratios, cfg.sampling, seed=cfg.seed,
                                hist_mask_ratio=cfg.hist_mask_ratio)
        t_tok += time.perf_counter() - t0
        t0 = time.perf_counter()
        images = to_uint8(decode_images(model, codes, chunk, cfg.seed, **dec_kw))
        t_dec += time.perf_counter() - t0
        for j, (k, per_ratio) in enumerate(zip(chunk, codes)):
            if k not in todo:  # finished by an earlier run (its batch is computed again, not its files)
                continue
            s = samples[k]
            entry = {"uid": s.uid, "gid": s.gid, "history": list(s.history), "target": s.target, "images": {}}
            for key, c, img in zip(keys, per_ratio, images[j * len(ratios): (j + 1) * len(ratios)]):
                rel = f"{key}/{k:05d}_u{s.uid}_t{s.target}.png"
                _save_png(img, out_dir / rel)
                entry["images"][key] = {"path": rel, "codes": c.tolist()}
            own["samples"][str(k)] = entry
            _save_index(own, out_dir, own_name)
            generated += 1
            bar.update(1)
            if interrupt_after is not None and generated >= interrupt_after:
                bar.close()
                return SweepResult(own, out_dir, generated, skipped, t_tok, t_dec)
    bar.close()
    if world > 1:
        _save_index(own, out_dir, own_name)
        state.wait_for_everyone()
        if state.is_main_process:  # merge the shards into index.json, then remove them
            merged = _read_finished(out_dir, conf, split)
            index["samples"] = {k: merged[k] for k in sorted(merged, key=int)}
            _save_index(index, out_dir)
            for part in out_dir.glob(_shard_name("*")):
                part.unlink()
        state.wait_for_everyone()
        index = load_index(out_dir)
    else:
        _save_index(index, out_dir)
    return SweepResult(index, out_dir, generated, skipped, t_tok, t_dec)


# ------------------------------------------------------------------------------------------------- looking
def keep_counts(model: PigeonModel, ds, split: str, ks: Sequence[int], cfg: InferenceConfig) -> dict[int, dict]:
    """What α_r does to the reference of samples `ks` of `split`: per sample its reference tokens, how many are kept
    at each α_r of `cfg`, and its history tokens and how many are kept (the same at every α_r)."""
    from pigeon_utils.keep import HIST_TYPE

    samples = ds.samples(split)
    tokens = ImageTokenCache(ds, model.backbone.tokenizer, seed=cfg.seed)
    batch = prompt_batch(ds, [samples[k] for k in ks], ks, model.backbone, tokens, cfg.seed).to(model.device)
    keep = model.sweep_keep(batch.masks, cfg.ref_mask_ratios, noise=batch.noise,
                            hist_mask_ratio=cfg.hist_mask_ratio).cpu()
    ref = batch.masks.reference_code_mask.cpu()
    hist = (batch.masks.type_ids == HIST_TYPE).cpu()
    return {int(k): {"reference": int(ref[b].sum()), "kept": [int((keep[j, b] * ref[b]).sum()) for j in range(len(keep))],
                     "history": int(hist[b].sum()), "history_kept": int((keep[0, b] * hist[b]).sum())}
            for b, k in enumerate(ks)}


def tokens_per_ratio(index: dict) -> list[float]:
    """Mean number of visual tokens of the generated images, per α_r of a sweep index."""
    keys = [ratio_key(r) for r in index["config"]["ref_mask_ratios"]]
    n = np.array([[len(e["images"][key]["codes"]) for key in keys] for e in index["samples"].values()])
    return np.round(n.mean(0), 1).tolist() if len(n) else []
