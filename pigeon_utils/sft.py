"""Stage 1 of Pigeon: masked preference reconstruction (spec §3), trained with ``accelerate``.

What is trained: LoRA on the LMM's ``q_proj``/``v_proj``, the adapter MLP and (with our straight-through default)
the mask generator; the visual tokenizer, the detokenizer and the LMM's base weights stay frozen. Each step draws
one reference mask ratio α_r ~ U(0, 1) for the batch (spec §3.3), masks the history with α_h = 0.2 and the
reference (= the target image, spec §1.6) with α_r, and asks the LMM to write the *unmasked* target's visual tokens
and ``[/IMG]`` (token-averaged cross-entropy, spec §3.4).

Pieces:

* :class:`SFTConfig` — the knobs, with the paper's values for ``preset="lavit"`` (spec §3.5) and smaller ones for
  the toy (:meth:`SFTConfig.for_preset`).
* :class:`ImageTokenCache` — tokenizes each image once (the toy tokenizer is deterministic; LaVIT's is stochastic,
  so ``cache=False`` re-tokenizes on every use, as upstream does).
* :class:`SFTDataset` / :class:`SFTCollator` — samples → :class:`~pigeon_utils.model.PigeonBatch` (prompt ids,
  assembled sequences, mask-generator layout, per-sample Gumbel noise).
* :func:`train_sft` — the loop: ``accelerate`` (bf16 on GPU, fp32 on CPU; data-parallel when launched with
  ``accelerate launch`` or ``notebook_launcher``; DeepSpeed / FSDP through an accelerate config), AdamW, linear
  warm-up then linear decay to 0, gradient clipping, validation every ``eval_every`` steps with early stopping,
  resumable checkpoints, ``tqdm.auto`` progress.
* :func:`generate_images` / :func:`factor_scores` — a plain generation pass and the toy's style / semantic
  accuracy.

Reproducibility and data parallelism: the global batch is split across processes (``split_batches=True``), α_r of
step s comes from ``(seed, s)``, each sample's Gumbel noise from ``(seed, epoch, sample index)`` and the dropout RNG
is re-seeded from ``(seed, step, process)`` before every step. So a run resumed from a checkpoint continues exactly
as an uninterrupted one, and (without dropout) N processes compute the same update as one process with the same
global batch: the loss is normalised by the number of supervised tokens of the *global* batch.

Files under ``out_dir`` (default ``run_dir/sft``): ``checkpoint-<step>/`` (``lora/`` via peft ``save_pretrained``,
``adapter.safetensors``, ``mask_generator.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pt``,
``trainer_state.json``), ``best/`` (the lowest validation loss; what later stages load), ``loss_log.json`` and
``sft_config.json``. Every file and folder is written to a temporary name first and renamed, so an interrupted run
never leaves a half-written checkpoint.

Launching on several GPUs: put the training call in a script and run ``accelerate launch --num_processes 8
script.py`` (``accelerate config`` writes DDP / DeepSpeed / FSDP configs; pass one with ``--config_file``), or from a
notebook ``accelerate.notebook_launcher(train_fn, args, num_processes=8)``.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from pigeon_utils.atomic import atomic_write_text
from pigeon_utils.config import from_dict_strict
from pigeon_utils.model import PigeonBatch, PigeonModel, PigeonModelConfig
from pigeon_utils.prompts import N_HISTORY, encode_prompt, segment_prompt
from pigeon_utils.sequence import assemble, mask_layout

__all__ = ["SFTConfig", "ImageTokenCache", "SFTDataset", "SFTCollator", "EpochSampler", "SFTResult", "train_sft",
           "evaluate_loss", "load_sft_model", "latest_checkpoint", "generate_images", "factor_scores",
           "step_ref_mask_ratio", "history_style_accuracy"]

CHECKPOINT_PREFIX = "checkpoint-"


# ------------------------------------------------------------------------------------------------- config
@dataclass
class SFTConfig:
    """Stage-1 settings. ``for_preset("lavit")`` gives the paper's (spec §3.5); ``for_preset("toy")`` a run of a few
    minutes on 2 CPU cores.

    ``batch_size`` is the *global* batch (split across processes). ``max_steps`` caps the run (None: ``epochs``
    full passes). Validation every ``eval_every`` steps on at most ``max_eval_samples`` validation samples (a fixed
    subset, with fixed masks and α_r, so successive evaluations are comparable — upstream re-draws them, spec
    §10.14); training stops after ``patience`` evaluations without improvement. A checkpoint is written at every
    evaluation; the last ``save_total_limit`` are kept, plus ``best/``. ``optim``: ``"adamw_torch"`` or
    ``"adamw_bnb_8bit"`` (upstream; needs bitsandbytes and a GPU). ``mixed_precision``: ``"auto"`` = bf16 on CUDA,
    fp32 (``"no"``) on CPU. ``adapter_only_steps``: for the first N optimiser steps only the adapter learns (every
    other trainable part — LoRA, a straight-through mask generator — has learning rate 0, then follows the same
    schedule); 0 (the reference, spec §3.5) trains everything from the start. The toy preset uses 300: with it, five
    toy-sticker SFT seeds of six learn to draw the reference's glyph from E (beam-sample: 31–60 % at α_r = 0,
    chance 14 %), where without it one seed in four did (deviation S8, README).
    """

    lr: float = 1e-5
    batch_size: int = 16
    epochs: int = 50
    max_steps: Optional[int] = None
    warmup_steps: int = 20
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    eval_every: int = 25
    max_eval_samples: Optional[int] = 1000
    eval_batch_size: Optional[int] = None
    patience: int = 10
    save_total_limit: int = 5
    seed: int = 123
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    cache_tokens: bool = True
    max_train_samples: Optional[int] = None
    ref_mask_ratio_range: tuple[float, float] = (0.0, 1.0)
    adapter_only_steps: int = 0
    model: PigeonModelConfig = field(default_factory=PigeonModelConfig)
    # generation defaults for looking at results (spec §5.2)
    max_new_tokens: int = 300
    min_new_tokens: int = 20

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = PigeonModelConfig.from_dict(self.model)
        self.adam_betas = tuple(self.adam_betas)
        self.ref_mask_ratio_range = tuple(self.ref_mask_ratio_range)
        for name in ("batch_size", "epochs", "eval_every", "patience", "save_total_limit"):
            v = getattr(self, name)
            if int(v) != v or v < 1:
                raise ValueError(f"SFTConfig.{name} must be a positive integer, got {v!r}")
        if int(self.adapter_only_steps) != self.adapter_only_steps or self.adapter_only_steps < 0:
            raise ValueError(f"SFTConfig.adapter_only_steps must be a non-negative integer, "
                             f"got {self.adapter_only_steps!r}")
        if self.max_steps is not None and (int(self.max_steps) != self.max_steps or self.max_steps < 1):
            raise ValueError(f"SFTConfig.max_steps must be None or a positive integer, got {self.max_steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"SFTConfig.lr must be a positive number, got {self.lr!r}")
        if self.optim not in ("adamw_torch", "adamw_bnb_8bit"):
            raise ValueError(f"SFTConfig.optim={self.optim!r}: expected 'adamw_torch' or 'adamw_bnb_8bit'")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"SFTConfig.mixed_precision={self.mixed_precision!r}: expected auto / no / bf16 / fp16")
        lo, hi = self.ref_mask_ratio_range
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"SFTConfig.ref_mask_ratio_range must satisfy 0 <= lo <= hi <= 1, got {(lo, hi)}")

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "SFTConfig":
        """The preset's defaults, with `overrides` (``model=`` may be a dict of :class:`PigeonModelConfig` fields)."""
        if preset == "lavit":
            base: dict[str, Any] = {}
        elif preset == "toy":
            base = dict(lr=2e-3, batch_size=16, epochs=50, max_steps=600, warmup_steps=20, eval_every=50,
                        max_eval_samples=128, patience=4, seed=123, max_new_tokens=40, min_new_tokens=1,
                        adapter_only_steps=300,
                        model=dict(adapter_hidden=128, mask_feedforward=256))
        else:
            raise ValueError(f"preset={preset!r}: expected 'toy' or 'lavit'")
        model = {**base.pop("model", {}), **(overrides.pop("model", None) or {})}
        if isinstance(model, PigeonModelConfig):
            model = asdict(model)
        return cls(**{**base, **overrides}, model=PigeonModelConfig(**model))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SFTConfig":
        return from_dict_strict(cls, d)


def step_ref_mask_ratio(seed: int, step: int, lo: float = 0.0, hi: float = 1.0, stream: str = "train") -> float:
    """α_r ~ U(lo, hi) for one batch (spec §3.3), a pure function of (seed, stream, step): every process of a
    data-parallel run and a resumed run draw the same value."""
    return random.Random(f"{seed}/{stream}/{step}").uniform(lo, hi)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + int(index) * 104_729) % (2**63 - 1)


# ------------------------------------------------------------------------------------------------- data
class ImageTokenCache:
    """Visual tokens (code ids) per image id, tokenized in batches on first use.

    ``cache=False`` tokenizes on every call (LaVIT's tokenizer is stochastic, spec §1.7; upstream re-tokenizes every
    step). ``tokenize`` defaults to ``backbone.tokenizer.tokenize``.
    """

    def __init__(self, ds, tokenize: Callable, cache: bool = True, batch_size: int = 64):
        self.ds, self.tokenize, self.cache, self.batch_size = ds, tokenize, cache, int(batch_size)
        self._codes: dict[int, Tensor] = {}

    def _run(self, iids: Sequence[int]) -> list[Tensor]:
        out: list[Tensor] = []
        for k in range(0, len(iids), self.batch_size):
            chunk = iids[k: k + self.batch_size]
            toks = self.tokenize([self.ds.load_image(i) for i in chunk])
            out.extend(c.reshape(-1).long().cpu() for c in toks.codes)
        return out

    def warm(self, iids: Sequence[int], progress: bool = False) -> None:
        """Tokenize every image of `iids` not yet cached (no-op without caching)."""
        if not self.cache:
            return
        todo = sorted({int(i) for i in iids} - set(self._codes))
        from tqdm.auto import tqdm

        for k in tqdm(range(0, len(todo), self.batch_size), desc="tokenizing images", disable=not progress or not todo):
            chunk = todo[k: k + self.batch_size]
            self._codes.update(zip(chunk, self._run(chunk)))

    def codes(self, iids: Sequence[int]) -> list[Tensor]:
        iids = [int(i) for i in iids]
        if not self.cache:
            return self._run(iids)
        self.warm(iids)
        return [self._codes[i] for i in iids]


class SFTDataset(torch.utils.data.Dataset):
    """The samples of one split with their encoded prompts (spec §1.3-1.4; encoded once, BOS-free, placeholders
    spliced in by id). Items: ``{"index", "prompt_ids", "iids"}`` (five history iids, then the target)."""

    def __init__(self, ds, split: str, encode_text: Callable[[str], list[int]], layout,
                 max_samples: Optional[int] = None):
        samples = ds.samples(split)
        if max_samples is not None:
            samples = samples[: int(max_samples)]
        if not samples:
            raise ValueError(f"split {split!r} of {ds.root} has no samples")
        self.samples = samples
        self.prompt_ids = [encode_prompt(segment_prompt(ds.prompt(s)), encode_text, layout) for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "prompt_ids": self.prompt_ids[i], "iids": self.samples[i].iids}


class SFTCollator:
    """Items → :class:`~pigeon_utils.model.PigeonBatch`.

    ``train=True``: the sequence ends in ``[IMG] target [/IMG]`` with labels; ``False``: in ``[IMG]`` (inference).
    The reference for the mask generator is the target image (spec §1.6). Each sample's Exp(1) noise for the
    Gumbel top-k is drawn from a generator seeded by ``(seed, epoch, index)``; set :attr:`epoch` per epoch.
    """

    def __init__(self, tokens: ImageTokenCache, layout, seed: int, train: bool = True):
        self.tokens, self.layout, self.seed, self.train = tokens, layout, int(seed), bool(train)
        self.epoch = 0

    def __call__(self, items: list[dict]) -> PigeonBatch:
        iids = [i for it in items for i in it["iids"]]
        codes = self.tokens.codes(iids)
        off = self.layout.visual_offset
        per = N_HISTORY + 1
        history = [[codes[b * per + k] + off for k in range(N_HISTORY)] for b in range(len(items))]
        target = [codes[b * per + N_HISTORY] + off for b in range(len(items))]
        seq = assemble([it["prompt_ids"] for it in items], history, target if self.train else None, self.layout)
        masks = mask_layout(history, target, self.layout)
        lengths = (~masks.padding_mask).sum(1).tolist()
        noise = torch.ones(masks.ids.shape)
        for b, (it, n) in enumerate(zip(items, lengths)):  # one generator per sample (not per token)
            g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, it["index"]))
            noise[b, :n] = torch.empty(n).exponential_(generator=g)
        index = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return PigeonBatch(seq=seq, masks=masks, noise=noise, index=index)


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of the dataset per epoch, a pure function of ``(seed, epoch)`` (call :meth:`set_epoch`)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 31 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


# ------------------------------------------------------------------------------------------------- files
def _atomic_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Write a folder under a temporary name, then swap it in (an old folder of that name is replaced)."""
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old{os.getpid()}")
        final.replace(old)
        tmp.replace(final)
        shutil.rmtree(old)
    else:
        tmp.replace(final)
    return final


def latest_checkpoint(out_dir: Path | str) -> Optional[Path]:
    """The complete ``checkpoint-<step>`` folder with the highest step in `out_dir`, or None."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_sft_model(backbone, folder: Path | str, config: Optional[PigeonModelConfig] = None) -> PigeonModel:
    """A :class:`PigeonModel` on `backbone` with the Stage-1 weights of `folder` (``best/`` or a
    ``checkpoint-<step>/``); the model config is read from ``pigeon_model.json`` unless given."""
    folder = Path(folder)
    if config is None:
        cfg_file = folder / "pigeon_model.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file}: not a Pigeon Stage-1 checkpoint (no pigeon_model.json)")
        config = PigeonModelConfig.from_dict(json.loads(cfg_file.read_text()))
    return PigeonModel(backbone, config).load_trained(folder).eval()


# ------------------------------------------------------------------------------------------------- training
@dataclass
class SFTResult:
    """What :func:`train_sft` returns: the model (best weights loaded), the log, and where things went."""

    model: PigeonModel
    log: dict
    out_dir: Path
    best_dir: Optional[Path]
    steps: int
    seconds: float
    stopped_early: bool


def _linear_schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then linear decay to 0 at `total` — the factor of
    transformers' ``get_linear_schedule_with_warmup`` (HF Trainer's ``linear``, spec §3.5), written out because that
    function gives every parameter group the same schedule and ``adapter_only_steps`` needs one per group."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def _make_optimizer(cfg: SFTConfig, params):
    if cfg.optim == "adamw_bnb_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("optim='adamw_bnb_8bit' (the paper's optimiser) needs bitsandbytes and a CUDA GPU; "
                              "install bitsandbytes or use optim='adamw_torch'") from e
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                   weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate_loss(model, loader, accelerator, seed: int, lo: float = 0.0, hi: float = 1.0,
                  ref_mask_ratio: Optional[float] = None) -> float:
    """Token-averaged validation loss (spec §3.4) over `loader`, with α_r of batch j drawn from ``(seed, j)``
    (or fixed to `ref_mask_ratio`), in eval mode: the same number on every call for the same weights."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for j, batch in enumerate(loader):
        r = ref_mask_ratio if ref_mask_ratio is not None else step_ref_mask_ratio(seed, j, lo, hi, "valid")
        with accelerator.autocast():
            out = model(batch, r)
        total += torch.stack([out.loss_sum.detach().double(), out.num_tokens.double()])
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1))


def train_sft(cfg: SFTConfig, run, *, backbone=None, out_dir: Path | str | None = None,
              resume: bool | str | Path = True, interrupt_after: Optional[int] = None, progress: bool = True,
              on_eval: Optional[Callable[[PigeonModel, int, dict], None]] = None,
              accelerator=None) -> SFTResult:
    """Train Stage 1 (see the module docstring) and return an :class:`SFTResult`.

    ``run``: a :class:`~pigeon_utils.config.RunConfig` (dataset, checkpoint folder, device, ``max_samples``).
    ``backbone``: an already loaded backbone (default: ``load_backbone(run.preset, run.checkpoint_dir)``).
    ``resume``: True = continue from the latest checkpoint in ``out_dir`` when there is one; a path = from that
    checkpoint; False = start over (existing checkpoints are left alone but will be overwritten).
    ``interrupt_after``: stop after this many optimiser steps *of this call*, right after saving a checkpoint (what
    a killed run leaves behind; used by the resume test). ``on_eval(model, step, log)``: called on the main
    process after each evaluation (the notebook draws reconstructions there).
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from tqdm.auto import tqdm

    from pigeon_utils.backbone import load_backbone
    from pigeon_utils.config import pick_device
    from pigeon_utils.data import open_dataset

    t0 = time.perf_counter()
    if accelerator is None:
        want = pick_device(run.device)
        mp = cfg.mixed_precision
        if mp == "auto":
            mp = "bf16" if want.type == "cuda" else "no"
        accelerator = Accelerator(mixed_precision=mp, cpu=want.type == "cpu",
                                  dataloader_config=DataLoaderConfiguration(split_batches=True))
    world = accelerator.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"SFTConfig.batch_size={cfg.batch_size} (the global batch) must be divisible by the number "
                         f"of processes ({world})")
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / "sft"
    main = accelerator.is_main_process

    torch.manual_seed(cfg.seed)  # identical initialisation of LoRA / adapter / generator on every process
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if backbone is None:
        backbone = load_backbone(run.preset, run.checkpoint_dir, device=accelerator.device)
    model = PigeonModel(backbone, cfg.model).to(accelerator.device)
    if cfg.gradient_checkpointing:
        model.lmm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    ds = open_dataset(run.data_dir, run.scenario)
    max_train = cfg.max_train_samples if cfg.max_train_samples is not None else run.max_samples
    train_set = SFTDataset(ds, "train", backbone.encode_text, backbone.layout, max_samples=max_train)
    n_eval = cfg.max_eval_samples
    if run.max_samples is not None:
        n_eval = min(n_eval or run.max_samples, run.max_samples)
    valid_set = SFTDataset(ds, "valid", backbone.encode_text, backbone.layout, max_samples=n_eval)
    tokens = ImageTokenCache(ds, backbone.tokenizer.tokenize, cache=cfg.cache_tokens)
    tokens.warm([i for s in train_set.samples + valid_set.samples for i in s.iids], progress=progress and main)
    if len(train_set) < cfg.batch_size:
        raise ValueError(f"the training split has {len(train_set)} samples, fewer than batch_size={cfg.batch_size}")

    collate = SFTCollator(tokens, backbone.layout, cfg.seed, train=True)
    valid_collate = SFTCollator(tokens, backbone.layout, cfg.seed + 1, train=True)
    sampler = EpochSampler(len(train_set), cfg.seed)
    train_dl = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                           collate_fn=collate, drop_last=True, generator=torch.Generator())
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    eval_bs = max(world, eval_bs - eval_bs % world)
    valid_dl = torch.utils.data.DataLoader(valid_set, batch_size=eval_bs, shuffle=False, collate_fn=valid_collate)
    steps_per_epoch = len(train_dl)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    sched = functools.partial(_linear_schedule, warmup=cfg.warmup_steps, total=total_steps)
    if cfg.adapter_only_steps:  # two groups: everything but the adapter waits (learning rate 0) at first
        adapter = {id(p) for p in model.adapter.parameters()}
        groups = [{"params": [p for p in params if id(p) not in adapter]},
                  {"params": [p for p in params if id(p) in adapter]}]
        lambdas = [lambda step: 0.0 if step < cfg.adapter_only_steps else sched(step), sched]
    else:
        groups, lambdas = params, sched
    optimizer = _make_optimizer(cfg, groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    pmodel, optimizer, train_dl, valid_dl, scheduler = accelerator.prepare(model, optimizer, train_dl, valid_dl,
                                                                           scheduler)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_val": None, "best_step": None, "bad_evals": 0,
             "stopped_early": False, "log": {"train": [], "valid": [], "lr": []}}
    ckpt = None
    if resume:
        ckpt = Path(resume) if not isinstance(resume, bool) else latest_checkpoint(out_dir)
    if ckpt is not None:
        if not (ckpt / "trainer_state.json").is_file():
            raise FileNotFoundError(f"{ckpt}: not a complete Stage-1 checkpoint (trainer_state.json missing)")
        model.load_trained(ckpt)
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", map_location="cpu", weights_only=False))
        _set_rng_state(torch.load(ckpt / "rng_state.pt", map_location="cpu", weights_only=False))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if main:
            print(f"resumed from {ckpt} (step {state['step']})")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _atomic_json(cfg.to_dict(), out_dir / "sft_config.json")

    def save_checkpoint():
        accelerator.wait_for_everyone()
        if not main:
            accelerator.wait_for_everyone()
            return
        unwrapped = accelerator.unwrap_model(pmodel)

        def write(d: Path):
            unwrapped.save_pretrained(d)
            torch.save(optimizer.state_dict(), d / "optimizer.pt")
            torch.save(scheduler.state_dict(), d / "scheduler.pt")
            torch.save(_rng_state(), d / "rng_state.pt")
            _atomic_json(cfg.to_dict(), d / "sft_config.json")
            _atomic_json(state, d / "trainer_state.json")

        _atomic_dir(out_dir / f"{CHECKPOINT_PREFIX}{state['step']}", write)
        olds = sorted((int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*")
                      if p.name[len(CHECKPOINT_PREFIX):].isdigit())
        for _, p in olds[: max(0, len(olds) - cfg.save_total_limit)]:
            shutil.rmtree(p, ignore_errors=True)
        _atomic_json(state["log"], out_dir / "loss_log.json")
        accelerator.wait_for_everyone()

    def run_eval():
        val = evaluate_loss(pmodel, valid_dl, accelerator, cfg.seed, *cfg.ref_mask_ratio_range)
        state["log"]["valid"].append({"step": state["step"], "loss": val})
        improved = state["best_val"] is None or val < state["best_val"]
        if improved:
            state["best_val"], state["best_step"], state["bad_evals"] = val, state["step"], 0
            if main:
                _atomic_dir(out_dir / "best", lambda d: accelerator.unwrap_model(pmodel).save_pretrained(d))
        else:
            state["bad_evals"] += 1
        if main and on_eval is not None:
            on_eval(accelerator.unwrap_model(pmodel), state["step"], state["log"])
            pmodel.train()  # the callback may have switched to eval mode
        return val

    if state["step"] == 0 and not state["log"]["valid"]:
        run_eval()  # step 0: the pre-trained LMM (LoRA = identity) with a fresh adapter

    bar = tqdm(total=total_steps, initial=state["step"], desc="SFT", disable=not (progress and main))
    steps_this_call = 0
    pmodel.train()
    done = state["step"] >= total_steps or state["stopped_early"]
    while not done:
        epoch = state["epoch"]
        sampler.set_epoch(epoch)
        collate.epoch = epoch
        loader = train_dl
        if state["batch_in_epoch"]:
            loader = accelerator.skip_first_batches(train_dl, state["batch_in_epoch"])
        for batch in loader:
            step = state["step"]
            torch.manual_seed(_sample_seed(cfg.seed, step, 10_000_000 + accelerator.process_index))  # dropout
            r = step_ref_mask_ratio(cfg.seed, step, *cfg.ref_mask_ratio_range)
            with accelerator.autocast():
                out = pmodel(batch, r)
            n_global = accelerator.reduce(out.num_tokens.detach().float(), "sum").clamp_min(1)
            # Σ over this process's tokens / tokens of the global batch; DDP averages over processes → × world
            accelerator.backward(out.loss_sum * (world / n_global))
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(accelerator.reduce(out.loss_sum.detach().float(), "sum") / n_global)
            state["step"] += 1
            state["batch_in_epoch"] += 1
            steps_this_call += 1
            state["log"]["train"].append({"step": state["step"], "loss": loss, "ref_mask_ratio": r})
            state["log"]["lr"].append({"step": state["step"], "lr": scheduler.get_last_lr()[0]})
            bar.update(1)
            best = state["best_val"]
            bar.set_postfix(loss=f"{loss:.3f}", best_val="-" if best is None else f"{best:.3f}")
            last = state["step"] >= total_steps
            if state["batch_in_epoch"] >= steps_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            interrupted = interrupt_after is not None and steps_this_call >= interrupt_after
            if state["step"] % cfg.eval_every == 0 or last or interrupted:
                if state["step"] % cfg.eval_every == 0 or last:
                    run_eval()
                    if state["bad_evals"] >= cfg.patience:
                        state["stopped_early"] = True
                save_checkpoint()
            if last or state["stopped_early"] or interrupted:
                done = True
                break
            if state["batch_in_epoch"] == 0:
                break  # next epoch
    bar.close()
    if main:
        _atomic_json(state["log"], out_dir / "loss_log.json")
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(pmodel)
    best_dir = out_dir / "best"
    finished = state["step"] >= total_steps or state["stopped_early"]
    if finished and best_dir.is_dir():
        model.load_trained(best_dir)  # upstream: load_best_model_at_end
    model.eval()
    return SFTResult(model=model, log=state["log"], out_dir=out_dir, best_dir=best_dir if best_dir.is_dir() else None,
                     steps=state["step"], seconds=time.perf_counter() - t0, stopped_early=state["stopped_early"])


# ------------------------------------------------------------------------------------------------- looking
def inference_batch(ds, samples, backbone, tokens: Optional[ImageTokenCache] = None, seed: int = 0) -> PigeonBatch:
    """The inference prompts (ending in ``[IMG]``) of `samples`, with per-sample mask noise from `seed`."""
    tokens = tokens or ImageTokenCache(ds, backbone.tokenizer.tokenize)
    prompts = [encode_prompt(segment_prompt(ds.prompt(s)), backbone.encode_text, backbone.layout) for s in samples]
    items = [{"index": k, "prompt_ids": p, "iids": s.iids} for k, (s, p) in enumerate(zip(samples, prompts))]
    return SFTCollator(tokens, backbone.layout, seed, train=False)(items)


def generate_images(model: PigeonModel, ds, samples, ref_mask_ratio: float, *, tokens=None, seed: int = 0,
                    batch_size: int = 16, max_new_tokens: int = 300, min_new_tokens: int = 20,
                    decode: bool = True, progress: bool = False, **gen_kw) -> dict:
    """Generate one image per sample at α_r = ``ref_mask_ratio`` (history masked at the model's α_h).

    Returns ``{"codes": [Tensor], "images": uint8 [N, H, W, 3] or None}``. Deterministic given `seed`.
    """
    from tqdm.auto import tqdm

    model.eval()
    codes: list[Tensor] = []
    images = []
    g = torch.Generator(device="cpu").manual_seed(seed)
    for k in tqdm(range(0, len(samples), batch_size), desc=f"generate α_r={ref_mask_ratio}", disable=not progress):
        chunk = samples[k: k + batch_size]
        batch = inference_batch(ds, chunk, model.backbone, tokens, seed=seed + k).to(model.device)
        torch.manual_seed(seed * 7_919 + k)
        c = model.generate(batch, ref_mask_ratio, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                           **gen_kw)
        codes.extend(c)
        if decode:
            img = model.decode(c, generator=g)
            images.append((img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return {"codes": codes, "images": torch.cat(images).numpy() if decode else None}


STYLE_FACTORS = ("colour", "pattern", "stroke")


def history_style_accuracy(pred: Sequence[dict], history: Sequence[Sequence[dict]],
                           factors: Sequence[str] = STYLE_FACTORS) -> float:
    """Share of (image, style factor) pairs whose predicted value is a most frequent value of that factor among
    the sample's five history images (ties: any of the tied values counts)."""
    from collections import Counter

    hits = []
    for p, hist in zip(pred, history):
        for f in factors:
            c = Counter(h[f] for h in hist)
            top = max(c.values())
            hits.append(p[f] in {v for v, n in c.items() if n == top})
    return float(np.mean(hits)) if hits else float("nan")


def factor_scores(pred: Sequence[dict], ds, samples) -> dict[str, float]:
    """Toy accuracies of generated images: ``style`` w.r.t. the user's history (:func:`history_style_accuracy`)
    and ``semantic`` = glyph equal to the reference's (= target's) glyph, plus per-factor accuracies vs the target."""
    if ds.factors is None:
        raise ValueError(f"{ds.root}: factor accuracies need a toy dataset with factors.json")
    hist = [[ds.factors[i] for i in s.history] for s in samples]
    ref = [ds.factors[s.target] for s in samples]
    out = {"style": history_style_accuracy(pred, hist),
           "semantic": float(np.mean([p["glyph"] == r["glyph"] for p, r in zip(pred, ref)]))}
    for f in STYLE_FACTORS:
        out[f"{f}_vs_reference"] = float(np.mean([p[f] == r[f] for p, r in zip(pred, ref)]))
    return out


def pretrained_model(run, cfg: SFTConfig, device=None) -> PigeonModel:
    """The Stage-1 starting point: the pre-trained LMM (LoRA = identity) with a freshly initialised adapter and
    mask generator, exactly as :func:`train_sft` initialises them (same seed) — the "before SFT" baseline."""
    from pigeon_utils.backbone import load_backbone
    from pigeon_utils.config import pick_device

    device = device or pick_device(run.device)
    torch.manual_seed(cfg.seed)
    return PigeonModel(load_backbone(run.preset, run.checkpoint_dir, device=device), cfg.model).to(device).eval()


def compare_generation(models: dict, ds, samples, ref_mask_ratio: float, clip, *, seed: int = 0,
                       max_new_tokens: int = 40, min_new_tokens: int = 1, progress: bool = False) -> dict:
    """Generate one image per sample with each model at α_r = ``ref_mask_ratio`` and score it (toy world).

    ``clip``: an object with ``predict_factors(uint8 images) -> list[dict]`` (the toy CLIP's zero-shot factor
    classifier). Returns ``{name: {"scores": factor_scores(...), "images": uint8 [N, H, W, 3], "factors": [...],
    "tokens_per_image": float}}``. Every model gets the same prompts, masks noise and sampling seed.
    """
    out = {}
    for name, model in models.items():
        gen = generate_images(model, ds, samples, ref_mask_ratio, seed=seed, max_new_tokens=max_new_tokens,
                              min_new_tokens=min_new_tokens, progress=progress)
        pred = clip.predict_factors(gen["images"])
        out[name] = {"scores": factor_scores(pred, ds, samples), "images": gen["images"], "factors": pred,
                     "tokens_per_image": float(np.mean([len(c) for c in gen["codes"]]))}
    return out
