"""The one training loop, shared by every stage (Stage 1 now, Stage 2 next), on ``accelerate``.

A stage supplies only what is its own — a :class:`Stage`: the model, the training / validation datasets and
collators, the loss of a batch, and optionally its parameter groups — and :func:`train` does the rest:

* ``accelerate`` (bf16 on GPU, fp32 on CPU; data-parallel when launched with ``accelerate launch`` or
  ``notebook_launcher``; DeepSpeed / FSDP through an accelerate config); the global batch is split across
  processes and the loss is normalised by the number of supervised tokens of the *global* batch, so N processes
  compute the update of one process with the same batch (without dropout);
* AdamW (or bitsandbytes' 8-bit AdamW, the paper's), linear warm-up then linear decay to 0, gradient clipping;
* validation every ``eval_every`` steps (and at step 0), early stopping after ``patience`` evaluations without
  improvement, ``best/`` = the model with the lowest validation loss, loaded at the end;
* checkpoints ``checkpoint-<step>/`` at every evaluation (the last ``save_total_limit`` kept): the model's own
  files, ``optimizer.pt`` (tensors only), ``scheduler.json``, ``rng_state.pt`` (tensors and numbers) and
  ``trainer_state.json``. Resuming reads them with ``torch.load(weights_only=True)`` and JSON, so a run folder
  someone hands you cannot run code. Every file and folder is written under a temporary name and renamed;
* exact resume: the epoch's order comes from ``(seed, epoch)``, the dropout RNG is re-seeded from
  ``(seed, step, process)`` before every step, so a resumed run continues exactly as an uninterrupted one;
* ``tqdm.auto`` progress.

Launching on several GPUs: put the training call in a script and run ``accelerate launch --num_processes 8
script.py``, or from a notebook ``accelerate.notebook_launcher(train_fn, args, num_processes=8)``.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from pigeon_utils.atomic import atomic_dir, atomic_write_text
from pigeon_utils.batching import EpochSampler
from pigeon_utils.seeds import step_seed

__all__ = ["TrainConfig", "Stage", "TrainResult", "make_accelerator", "train", "evaluate", "evaluate_loss",
           "latest_checkpoint", "linear_schedule", "CHECKPOINT_PREFIX"]

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    """What every stage's training shares. ``batch_size`` is the *global* batch (split across processes);
    ``max_steps`` caps the run (None: ``epochs`` full passes). Validation every ``eval_every`` steps on at most
    ``max_eval_samples`` validation samples (a fixed subset, with fixed masks and α_r, so successive evaluations
    are comparable); training stops after ``patience`` evaluations without improvement. A checkpoint is written at
    every evaluation; the last ``save_total_limit`` are kept, plus ``best/``. ``optim``: ``"adamw_torch"`` or
    ``"adamw_bnb_8bit"`` (upstream; needs bitsandbytes and a GPU). ``mixed_precision``: ``"auto"`` = bf16 on CUDA,
    fp32 (``"no"``) on CPU."""

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

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        name = type(self).__name__
        for key in ("batch_size", "epochs", "eval_every", "patience", "save_total_limit"):
            v = getattr(self, key)
            if int(v) != v or v < 1:
                raise ValueError(f"{name}.{key} must be a positive integer, got {v!r}")
        if self.max_steps is not None and (int(self.max_steps) != self.max_steps or self.max_steps < 1):
            raise ValueError(f"{name}.max_steps must be None or a positive integer, got {self.max_steps!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"{name}.lr must be a positive number, got {self.lr!r}")
        if self.optim not in ("adamw_torch", "adamw_bnb_8bit"):
            raise ValueError(f"{name}.optim={self.optim!r}: expected 'adamw_torch' or 'adamw_bnb_8bit'")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"{name}.mixed_precision={self.mixed_precision!r}: expected auto / no / bf16 / fp16")

    def to_dict(self) -> dict:
        return asdict(self)


class Stage:
    """What a training stage gives :func:`train`. Subclasses set the attributes and implement :meth:`loss`.

    ``name``: the progress bar's label; ``config``: a :class:`TrainConfig`; ``model``: a module with
    ``save_pretrained(folder)`` and ``load_trained(folder)``; ``train_set`` / ``valid_set``: map-style datasets;
    ``train_collate`` / ``valid_collate``: their collators (an ``epoch`` attribute, when present, is set at every
    epoch); ``config_file``: the name the config is written under in the output folder. ``average_info``: False
    (default) logs a training step's ``info`` as the stage returns it and validation's loss alone; True says that
    ``info``'s values are means over the batch's ``num`` items, and the loop logs their mean over the global batch
    at every step and over the validation set with the validation loss (both weighted by ``num``).
    """

    name: str = "train"
    config_file: str = "train_config.json"
    average_info: bool = False
    config: TrainConfig
    model: Any
    train_set: Any
    valid_set: Any
    train_collate: Callable
    valid_collate: Callable

    def loss(self, model, batch, step: int, train: bool) -> tuple[Tensor, Tensor, dict]:
        """``(loss_sum, num_tokens, log)`` of one batch: the summed loss over the batch's supervised tokens, their
        number, and what to log with this step. ``step``: the optimiser step (training) or the batch's position in
        the validation set (``train=False``; it must give the same value on every evaluation)."""
        raise NotImplementedError

    def param_groups(self, params: list, schedule: Callable[[int], float]) -> tuple[list, Any]:
        """The optimiser's parameter groups and their learning-rate factors (default: one group, `schedule`)."""
        return params, schedule


@dataclass
class TrainResult:
    """What :func:`train` returns: the model (best weights loaded when the run finished), the log, and where
    things went."""

    model: Any
    log: dict
    out_dir: Path
    best_dir: Optional[Path]
    steps: int
    seconds: float
    stopped_early: bool


def linear_schedule(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then linear decay to 0 at `total` — the factor of
    transformers' ``get_linear_schedule_with_warmup`` (HF Trainer's ``linear``), written out because that function
    gives every parameter group the same schedule and a stage may need one per group."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def make_accelerator(cfg: TrainConfig, device: str = "auto"):
    """An ``accelerate.Accelerator`` for `cfg` (mixed precision ``auto``: bf16 on CUDA, none on CPU) whose data
    loaders split the global batch across processes."""
    from accelerate import Accelerator, DataLoaderConfiguration

    from pigeon_utils.config import pick_device

    want = pick_device(device)
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if want.type == "cuda" else "no"
    return Accelerator(mixed_precision=mp, cpu=want.type == "cpu",
                       dataloader_config=DataLoaderConfiguration(split_batches=True))


def _make_optimizer(cfg: TrainConfig, params):
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


# ------------------------------------------------------------------------------------------------- files
def _write_json(obj, path: Path) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def latest_checkpoint(out_dir: Path | str) -> Optional[Path]:
    """The complete ``checkpoint-<step>`` folder with the highest step in `out_dir`, or None."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    found = [(int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*")
             if p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _rng_state() -> dict:
    """Python's, NumPy's and torch's RNG states as tensors and numbers (loadable with ``weights_only=True``)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": {"version": version, "state": torch.tensor(state, dtype=torch.int64), "gauss": gauss},
          "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached": float(cached)},
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    py, npy = st["python"], st["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the checkpoint {path.parent}")
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------- the loop
def _weighted_info(info: dict, n: Tensor, device) -> Tensor:
    """``info``'s values (sorted by key) × `n`, as float64 [K] (the numerators of a weighted mean)."""
    return torch.stack([torch.as_tensor(info[k], dtype=torch.float64, device=device).detach().reshape(())
                        for k in sorted(info)]) * n.to(device=device, dtype=torch.float64)


@torch.no_grad()
def evaluate(stage: Stage, model, loader, accelerator) -> tuple[float, dict]:
    """``(loss, info)`` of `stage` over `loader`, in eval mode: the token-averaged validation loss and, for a stage
    with ``average_info``, its ``info`` averaged over the validation set (weighted by each batch's ``num``; else
    ``{}``). The same numbers on every call for the same weights (the stage's validation draws depend on the
    batch's position only)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    keys, info_sum = None, None
    for j, batch in enumerate(loader):
        with accelerator.autocast():
            loss_sum, n, info = stage.loss(model, batch, j, train=False)
        total += torch.stack([loss_sum.detach().double(), n.double()])
        if stage.average_info and info:
            keys = sorted(info)
            w = _weighted_info(info, n, accelerator.device)
            info_sum = w if info_sum is None else info_sum + w
    total = accelerator.reduce(total, "sum")
    model.train(was_training)
    out = {}
    if info_sum is not None:
        info_sum = accelerator.reduce(info_sum, "sum")
        out = dict(zip(keys, (info_sum / total[1].clamp_min(1)).tolist()))
    return float(total[0] / total[1].clamp_min(1)), out


def evaluate_loss(stage: Stage, model, loader, accelerator) -> float:
    """The validation loss of :func:`evaluate` alone."""
    return evaluate(stage, model, loader, accelerator)[0]


def train(stage: Stage, out_dir: Path | str, accelerator, *, resume: bool | str | Path = True,
          interrupt_after: Optional[int] = None, progress: bool = True,
          on_eval: Optional[Callable[[Any, int, dict], None]] = None) -> TrainResult:
    """Train `stage` (see the module docstring); checkpoints, ``best/`` and the log go to `out_dir`.

    ``resume``: True = continue from the latest checkpoint in `out_dir` when there is one; a path = from that
    checkpoint; False = start over. ``interrupt_after``: stop after this many optimiser steps *of this call*, right
    after saving a checkpoint (what a killed run leaves behind; the resume tests use it). ``on_eval(model, step,
    log)``: called on the main process after each evaluation.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    cfg, model, out_dir = stage.config, stage.model, Path(out_dir)
    world, main = accelerator.num_processes, accelerator.is_main_process
    if cfg.batch_size % world:
        raise ValueError(f"{type(cfg).__name__}.batch_size={cfg.batch_size} (the global batch) must be divisible by "
                         f"the number of processes ({world})")
    if len(stage.train_set) < cfg.batch_size:
        raise ValueError(f"the training set has {len(stage.train_set)} samples, fewer than "
                         f"batch_size={cfg.batch_size}")
    sampler = EpochSampler(len(stage.train_set), cfg.seed)
    train_dl = torch.utils.data.DataLoader(stage.train_set, batch_size=cfg.batch_size, sampler=sampler,
                                           collate_fn=stage.train_collate, drop_last=True,
                                           generator=torch.Generator())
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    eval_bs = max(world, eval_bs - eval_bs % world)
    valid_dl = torch.utils.data.DataLoader(stage.valid_set, batch_size=eval_bs, shuffle=False,
                                           collate_fn=stage.valid_collate)
    steps_per_epoch = len(train_dl)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    groups, lambdas = stage.param_groups(params, lambda s: linear_schedule(s, cfg.warmup_steps, total_steps))
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
            raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (trainer_state.json missing)")
        model.load_trained(ckpt)
        optimizer.load_state_dict(_load(ckpt / "optimizer.pt"))
        scheduler.load_state_dict(json.loads((ckpt / "scheduler.json").read_text()))
        _set_rng_state(_load(ckpt / "rng_state.pt"))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if main:
            print(f"resumed from {ckpt} (step {state['step']})")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(cfg.to_dict(), out_dir / stage.config_file)

    def save_checkpoint():
        accelerator.wait_for_everyone()
        if main:
            def write(d: Path):
                accelerator.unwrap_model(pmodel).save_pretrained(d)
                torch.save(optimizer.state_dict(), d / "optimizer.pt")
                _write_json(scheduler.state_dict(), d / "scheduler.json")
                torch.save(_rng_state(), d / "rng_state.pt")
                _write_json(cfg.to_dict(), d / stage.config_file)
                _write_json(state, d / "trainer_state.json")

            atomic_dir(out_dir / f"{CHECKPOINT_PREFIX}{state['step']}", write)
            olds = sorted((int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*")
                          if p.name[len(CHECKPOINT_PREFIX):].isdigit())
            for _, p in olds[: max(0, len(olds) - cfg.save_total_limit)]:
                shutil.rmtree(p, ignore_errors=True)
            _write_json(state["log"], out_dir / "loss_log.json")
        accelerator.wait_for_everyone()

    def run_eval():
        val, val_info = evaluate(stage, pmodel, valid_dl, accelerator)
        state["log"]["valid"].append({"step": state["step"], "loss": val, **val_info})
        if state["best_val"] is None or val < state["best_val"]:
            state["best_val"], state["best_step"], state["bad_evals"] = val, state["step"], 0
            if main:
                atomic_dir(out_dir / "best", lambda d: accelerator.unwrap_model(pmodel).save_pretrained(d))
        else:
            state["bad_evals"] += 1
        if main and on_eval is not None:
            on_eval(accelerator.unwrap_model(pmodel), state["step"], state["log"])
            pmodel.train()  # the callback may have switched to eval mode

    if state["step"] == 0 and not state["log"]["valid"]:
        run_eval()  # step 0: the starting point

    bar = tqdm(total=total_steps, initial=state["step"], desc=stage.name, disable=not (progress and main))
    steps_this_call = 0
    pmodel.train()
    done = state["step"] >= total_steps or state["stopped_early"]
    while not done:
        epoch = state["epoch"]
        sampler.set_epoch(epoch)
        if hasattr(stage.train_collate, "epoch"):
            stage.train_collate.epoch = epoch  # the samples' mask noise is drawn per epoch
        loader = train_dl
        if state["batch_in_epoch"]:
            loader = accelerator.skip_first_batches(train_dl, state["batch_in_epoch"])
        for batch in loader:
            step = state["step"]
            torch.manual_seed(step_seed(cfg.seed, step, accelerator.process_index))  # dropout
            with accelerator.autocast():
                loss_sum, n_tokens, info = stage.loss(pmodel, batch, step, train=True)
            n_global = accelerator.reduce(n_tokens.detach().float(), "sum").clamp_min(1)
            # Σ over this process's tokens / tokens of the global batch; DDP averages over processes → × world
            accelerator.backward(loss_sum * (world / n_global))
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(accelerator.reduce(loss_sum.detach().float(), "sum") / n_global)
            if stage.average_info and info:  # the global batch's means, weighted by each process's num
                w = accelerator.reduce(_weighted_info(info, n_tokens, accelerator.device), "sum") / n_global
                info = dict(zip(sorted(info), w.tolist()))
            state["step"] += 1
            state["batch_in_epoch"] += 1
            steps_this_call += 1
            state["log"]["train"].append({"step": state["step"], "loss": loss, **info})
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
        _write_json(state["log"], out_dir / "loss_log.json")
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(pmodel)
    best_dir = out_dir / "best"
    if (state["step"] >= total_steps or state["stopped_early"]) and best_dir.is_dir():
        model.load_trained(best_dir)  # upstream: load_best_model_at_end
    model.eval()
    return TrainResult(model=model, log=state["log"], out_dir=out_dir,
                       best_dir=best_dir if best_dir.is_dir() else None, steps=state["step"],
                       seconds=time.perf_counter() - t0, stopped_early=state["stopped_early"])
