"""Stage 2 of Pigeon: pairwise preference optimisation, sigmoid DPO (docs/algorithm.md §4).

What is trained: only the Stage-1 model's LoRA (the *policy*). The adapter MLP and the mask generator are loaded
from the Stage-1 folder and frozen (no gradient, and kept in eval mode: no dropout); the LMM's dropout and the
LoRA dropout are 0 (§4.1, §4.5). The reference π_ref is the frozen Stage-1 model itself — never the base LMM with
the LoRA disabled.

The loss of a pair (§4.4), with log π(y) the **sum** of the full-vocabulary log-probabilities of y's scored tokens::

    L = −log σ(β · [(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]),   β = 0.1

summed over the batch's pairs and normalised by the number of pairs of the global batch (the shared loop's
``(loss_sum, num)`` contract), so data-parallel runs equal one process. Chosen and rejected rows go through the
LMM in one pass (2B rows, one input preparation per pair: :mod:`pigeon_utils.dpo_data`). Logged at every step
and with every validation loss, under TRL's names: ``rewards/chosen``, ``rewards/rejected`` (β·(log π − log π_ref),
detached), ``rewards/accuracies`` (chosen strictly above rejected), ``rewards/margins``, ``logps/chosen``,
``logps/rejected``.

The reference log-probabilities:

* ``precompute_ref_log_probs=True`` (default): computed once per pair before training, from the Stage-1 weights on
  exactly the inputs the policy sees (the pair's α_r, mask noise, image tokens), kept in memory and written to
  ``<out_dir>/reference_logps.safetensors`` with a fingerprint of the pairs, the settings and the Stage-1 files,
  so a resumed run reads them instead of computing them again;
* ``False``: recomputed at every step by a reference model. It is the policy module run with
  ``torch.func.functional_call`` on a detached copy of the Stage-1 LoRA tensors, under ``no_grad``. That copy is
  not a parameter, no optimiser holds it and nothing writes to it; every other weight is frozen and shared. So the
  reference is the Stage-1 model at every step, and it costs one LoRA-sized copy. A second peft adapter would do
  the same, but peft's ``set_adapter`` makes whichever adapter is active trainable, and ``save_pretrained`` would
  write it beside the policy.

Options that keep the reference code's behaviour where we fix it (``DPOConfig``): ``reference_inputs="redrawn"``
(the reference pass draws its own α_r and masks, §8.10), ``response_tokens="reference"`` (no ``[IMG]``, y1
unscored, §8.11) and ``frozen_dropout=True`` (the frozen adapter's and mask generator's dropout stay on in
training, §8.12).

Files under ``out_dir`` (default ``run_dir/dpo``): ``checkpoint-<step>/``, ``best/`` (a complete model folder —
policy LoRA, the frozen adapter and mask generator — that :func:`pigeon_utils.checkpoints.load_pigeon_model`
reads), ``loss_log.json``, ``dpo_config.json`` and ``reference_logps.safetensors``.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pigeon_utils.atomic import atomic_write
from pigeon_utils.batching import ImageTokenCache
from pigeon_utils.config import from_dict_strict
from pigeon_utils.dpo_data import REFERENCE_INPUTS, RESPONSE_TOKENS, DPOBatch, PairCollator, PairDataset
from pigeon_utils.keep import HIST_TYPE, TARGET_TYPE, gumbel_topk_keep, keep_probabilities
from pigeon_utils.model import PigeonModel
from pigeon_utils.sequence import EMB
from pigeon_utils.train import Stage, TrainConfig, TrainResult, make_accelerator, train

__all__ = ["DPOConfig", "DPOPolicy", "DPOStage", "dpo_loss", "dpo_metrics", "pair_keep", "pair_log_probs",
           "reference_cache", "dpo_stage", "train_dpo", "REFERENCE_FILE"]

REFERENCE_FILE = "reference_logps.safetensors"
LOSS_TYPES = ("sigmoid",)


@dataclass
class DPOConfig(TrainConfig):
    """Stage-2 settings: the paper's values by default (docs/algorithm.md §4.5: learning rate 5e-6, 20 warm-up steps
    then linear decay, batch 8 pairs, evaluation every 25 steps on 200 validation pairs, patience 10, 5 checkpoints,
    β 0.1, seed 123); ``for_preset`` adds a world's ``dpo`` overrides.

    ``beta``: β. ``loss_type``: ``"sigmoid"`` only. ``precompute_ref_log_probs``: see the module docstring.
    ``max_train_pairs``: cut the training pairs. Ours vs the reference code's behaviour:

    * ``reference_inputs``: ``"same"`` (ours) — the reference pass sees exactly the policy's inputs;
      ``"redrawn"`` (reference, §8.10) — it draws its own α_r ~ U(0, 1) and mask noise per pair (once when the
      reference log-probs are precomputed, else once per epoch; image tokens stay those of the policy pass);
    * ``response_tokens``: ``"all"`` (ours) — ``[IMG] y1 … yn [/IMG]``, scored exactly as Stage 1's labels;
      ``"reference"`` (§8.11) — no ``[IMG]``, y1 an unscored input, ``y2 … yn [/IMG]`` scored;
    * ``frozen_dropout``: False (ours) — the frozen adapter and mask generator run without dropout; True
      (reference, §8.12) — their dropout stays on in training (the precomputed reference still sees none).
    """

    lr: float = 5e-6
    batch_size: int = 8
    max_eval_samples: Optional[int] = 200
    beta: float = 0.1
    loss_type: str = "sigmoid"
    precompute_ref_log_probs: bool = True
    reference_inputs: str = "same"
    response_tokens: str = "all"
    frozen_dropout: bool = False
    max_train_pairs: Optional[int] = None

    def __post_init__(self):
        super().__post_init__()
        if not (self.beta > 0 and np.isfinite(self.beta)):
            raise ValueError(f"DPOConfig.beta must be a positive number, got {self.beta!r}")
        for key, allowed in (("loss_type", LOSS_TYPES), ("reference_inputs", REFERENCE_INPUTS),
                             ("response_tokens", RESPONSE_TOKENS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"DPOConfig.{key}={getattr(self, key)!r}: expected one of {allowed}")
        if self.max_train_pairs is not None and (int(self.max_train_pairs) != self.max_train_pairs
                                                 or self.max_train_pairs < 1):
            raise ValueError(f"DPOConfig.max_train_pairs must be None or a positive integer, "
                             f"got {self.max_train_pairs!r}")

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> "DPOConfig":
        """The preset's ``dpo`` defaults (:data:`pigeon_utils.worlds.WORLDS`, when the world has them), with
        `overrides`."""
        from pigeon_utils.worlds import world

        base: dict[str, Any] = dict(getattr(world(preset), "dpo", None) or {})
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "DPOConfig":
        return from_dict_strict(cls, d)


# ------------------------------------------------------------------------------------------------- the model
def pair_keep(model: PigeonModel, batch: DPOBatch, reference: bool = False) -> Tensor:
    """Hard keep decisions [B, L] at each pair's own α_r (training-time keep probabilities, docs/algorithm.md
    §2.3-2.5). The generator scores the tokens once and the history top-k (α_h) is taken once; the reference
    top-k is taken once per distinct α_r of the batch. Row b equals ``model.keep_mask(masks, ratio[b],
    inference=False, noise=noise)`` at row b (forward values; no gradient — the generator is frozen). The mask
    types without a generator go through ``keep_mask`` (``"random"`` draws from torch's RNG, so its masks are not
    fixed per pair)."""
    ratio, noise = batch.inputs(reference)
    masks, cfg = batch.masks, model.config
    values, which = torch.unique(ratio.detach().cpu(), return_inverse=True)
    rows = torch.arange(len(ratio))
    if cfg.mask_type != "mutual":
        keeps = torch.stack([model.keep_mask(masks, float(r), inference=False, noise=noise).keep for r in values])
        return keeps[which.to(keeps.device), rows.to(keeps.device)].detach()
    with torch.no_grad():
        e = model.token_embeddings(masks.ids).float()
        scores = model.mask_generator.score(e, masks.padding_mask, masks.position_ids, masks.type_ids)
        hist_q, target_q = keep_probabilities(scores.cos_sim, masks.type_ids, inference=False)
        hist, _ = gumbel_topk_keep(hist_q, masks.type_ids == HIST_TYPE, cfg.hist_mask_ratio, exponential=noise,
                                   straight_through=False)
        target = masks.type_ids == TARGET_TYPE
        ref = torch.stack([gumbel_topk_keep(target_q, target, float(r), exponential=noise, straight_through=False)[0]
                           for r in values])
    return hist + ref[which.to(ref.device), rows.to(ref.device)]


def pair_log_probs(model: PigeonModel, batch: DPOBatch, reference: bool = False) -> Tensor:
    """Summed log-probabilities of the batch's responses, [S·B] (chosen rows, then rejected rows): each pair's
    masks and ``E`` are computed once and shared by its rows (docs/algorithm.md §4.3); the embeddings are those of
    :meth:`PigeonModel.input_embeddings`. ``reference``: the reference pass's inputs (see :meth:`DPOBatch.inputs`)."""
    seq, b = batch.seq, len(batch)
    sides = seq.input_ids.shape[0] // b
    keep = pair_keep(model, batch, reference)
    e = model.reference_embedding(batch.masks, keep)
    x = model.token_embeddings(seq.input_ids)
    x = x * seq.keep_scale(keep.repeat(sides, 1)).unsqueeze(-1).to(x.dtype)
    x = torch.where((seq.token_type == EMB).unsqueeze(-1), e.repeat(sides, 1).to(x.dtype).unsqueeze(1), x)
    return model.sequence_log_probs(x, seq)


def _disable_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


class DPOPolicy(nn.Module):
    """The policy of Stage 2 around a Stage-1 :class:`PigeonModel` (``.pigeon``): only its LoRA trains; adapter and
    mask generator are frozen and, unless ``frozen_dropout``, always in eval mode; the LMM's dropout is 0.
    ``forward(batch)`` gives :func:`pair_log_probs`. ``keep_reference``: keep a detached copy of the starting LoRA
    for :meth:`reference_log_probs` (the module docstring says why this is the Stage-1 model at every step)."""

    def __init__(self, model: PigeonModel, *, frozen_dropout: bool = False, keep_reference: bool = False):
        super().__init__()
        self.pigeon, self.frozen_dropout = model, bool(frozen_dropout)
        for part in (model.adapter, model.mask_generator):
            if part is not None:
                part.requires_grad_(False)
        _disable_dropout(model.lmm)
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        other = [n for n in trainable if "lora_" not in n]
        if other or not trainable:
            raise ValueError(f"the DPO policy must train the LoRA alone; trainable: {other or 'nothing'}")
        self._reference: Optional[dict[str, Tensor]] = None
        if keep_reference:
            self._reference = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.frozen_dropout:
            for part in (self.pigeon.adapter, self.pigeon.mask_generator):
                if part is not None:
                    part.eval()
        return self

    def forward(self, batch: DPOBatch, reference: bool = False) -> Tensor:
        return pair_log_probs(self.pigeon, batch, reference)

    @property
    def reference_state(self) -> Optional[dict[str, Tensor]]:
        """The reference's LoRA tensors (None when the reference log-probs are precomputed instead)."""
        return self._reference

    @torch.no_grad()
    def reference_log_probs(self, batch: DPOBatch) -> Tensor:
        """π_ref's summed log-probabilities [S·B]: this module with the Stage-1 LoRA, on the reference inputs."""
        if self._reference is None:
            raise RuntimeError("this DPOPolicy keeps no reference (built with keep_reference=False)")
        return torch.func.functional_call(self, self._reference, (batch,), {"reference": True})

    def save_pretrained(self, folder: Path | str) -> Path:
        return self.pigeon.save_pretrained(folder)

    def load_trained(self, folder: Path | str) -> "DPOPolicy":
        self.pigeon.load_trained(folder)
        return self


# ------------------------------------------------------------------------------------------------- the loss
def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO per pair (docs/algorithm.md §4.4): ``(losses, chosen_rewards, rejected_rewards)``, each [B];
    rewards β·(log π − log π_ref), detached."""
    chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


def dpo_metrics(policy_chosen: Tensor, policy_rejected: Tensor, chosen_rewards: Tensor,
                rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Batch means under TRL's names (0-dim tensors)."""
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen.detach().mean(), "logps/rejected": policy_rejected.detach().mean()}


class DPOStage(Stage):
    """Stage 2 for :func:`~pigeon_utils.train.train`: the training and validation pairs, the DPO loss of a batch
    (reference log-probs from :attr:`reference` — the precomputed ``{"train", "valid"}`` [N, 2] tables — or, when it
    is None, from the policy's reference copy), its metrics averaged by the loop (``average_info``)."""

    name = "DPO"
    config_file = "dpo_config.json"
    average_info = True

    def __init__(self, cfg: DPOConfig, policy: DPOPolicy, ds, pairs_train: Sequence[Mapping],
                 pairs_valid: Sequence[Mapping], *, max_samples: Optional[int] = None, progress: bool = False):
        backbone = policy.pigeon.backbone
        self.config, self.model = cfg, policy
        n_train = min((n for n in (cfg.max_train_pairs, max_samples) if n is not None), default=None)
        n_eval = cfg.max_eval_samples
        if max_samples is not None:
            n_eval = min(n_eval or max_samples, max_samples)
        self.train_set = PairDataset(ds, "train", pairs_train, backbone, max_pairs=n_train)
        self.valid_set = PairDataset(ds, "valid", pairs_valid, backbone, max_pairs=n_eval)
        tokens = ImageTokenCache(ds, backbone.tokenizer, seed=cfg.seed)  # each image's tokens fixed (§1.7)
        tokens.warm(self.train_set.iids + self.valid_set.iids, progress=progress)
        kw = dict(response_tokens=cfg.response_tokens, reference_inputs=cfg.reference_inputs)
        self.train_collate = PairCollator(tokens, backbone.layout, cfg.seed, "train", **kw)
        self.valid_collate = PairCollator(tokens, backbone.layout, cfg.seed, "valid", **kw)
        self.reference: Optional[dict[str, Tensor]] = None

    def reference_log_probs(self, model, batch: DPOBatch, train: bool) -> tuple[Tensor, Tensor]:
        b = len(batch)
        if self.reference is not None:
            t = self.reference["train" if train else "valid"].to(batch.pair.device)[batch.pair]
            return t[:, 0], t[:, 1]
        from accelerate.utils import extract_model_from_parallel

        ref = extract_model_from_parallel(model).reference_log_probs(batch)
        return ref[:b], ref[b:]

    def loss(self, model, batch: DPOBatch, step: int, train: bool):
        b = len(batch)
        logps = model(batch).float()
        ref_c, ref_r = self.reference_log_probs(model, batch, train)
        losses, rew_c, rew_r = dpo_loss(logps[:b], logps[b:], ref_c.float(), ref_r.float(), self.config.beta)
        info = dpo_metrics(logps[:b], logps[b:], rew_c, rew_r)
        return losses.sum(), torch.tensor(b, device=losses.device), info


# ------------------------------------------------------------------------------------------------- the cache
def _fingerprint(stage: DPOStage, sft_dir: Path) -> str:
    """What the reference log-probs depend on: the pairs, the settings that shape the inputs, the Stage-1 files."""
    cfg = stage.config
    h = hashlib.sha256(json.dumps({
        "train": [p.to_dict() for p in stage.train_set.pairs], "valid": [p.to_dict() for p in stage.valid_set.pairs],
        "seed": cfg.seed, "reference_inputs": cfg.reference_inputs, "response_tokens": cfg.response_tokens},
        sort_keys=True).encode())
    for f in sorted(p for p in sft_dir.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(sft_dir)).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def _compute(stage: DPOStage, dataset: PairDataset, collate: PairCollator, accelerator) -> Tensor:
    policy, size = stage.model, stage.config.eval_batch_size or stage.config.batch_size
    collate = copy.copy(collate)
    collate.epoch = 0
    was = policy.training
    policy.eval()
    out = []
    for k in range(0, len(dataset), size):
        batch = collate([dataset[i] for i in range(k, min(k + size, len(dataset)))]).to(accelerator.device)
        with accelerator.autocast():
            out.append(policy(batch, reference=True).float().reshape(2, -1).T)
    policy.train(was)
    return torch.cat(out).cpu().contiguous()


def reference_cache(stage: DPOStage, accelerator, out_dir: Path | str, sft_dir: Path | str,
                    reuse: bool = True) -> dict[str, Tensor]:
    """The reference log-probs of every training and validation pair, ``{"train": [N, 2], "valid": [M, 2]}``
    (columns chosen, rejected), computed by the main process from the policy — which must still hold the Stage-1
    weights — and written to ``<out_dir>/reference_logps.safetensors``; with ``reuse``, a file there with the same
    fingerprint is read instead. Every process returns the main process's numbers."""
    from safetensors import safe_open
    from safetensors.torch import save

    path, fp = Path(out_dir) / REFERENCE_FILE, _fingerprint(stage, Path(sft_dir))

    def read() -> Optional[dict[str, Tensor]]:
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fp:
                return None
            return {k: f.get_tensor(k) for k in ("train", "valid")}

    cache = None
    if accelerator.is_main_process:
        cache = read() if reuse else None
        if cache is None:
            cache = {"train": _compute(stage, stage.train_set, stage.train_collate, accelerator),
                     "valid": _compute(stage, stage.valid_set, stage.valid_collate, accelerator)}
            data = save(cache, metadata={"fingerprint": fp})
            atomic_write(path, lambda f: f.write(data))
    accelerator.wait_for_everyone()
    if cache is None:
        cache = read()
        if cache is None:
            raise RuntimeError(f"{path}: the main process's reference log-probs are missing or stale")
    return cache


# ------------------------------------------------------------------------------------------------- the entry point
def dpo_stage(cfg: DPOConfig, run, pairs_train: Sequence[Mapping], pairs_valid: Sequence[Mapping], *,
              sft_dir: Path | str, backbone=None, accelerator=None, progress: bool = False) -> tuple[DPOStage, Any]:
    """``(stage, accelerator)`` as :func:`train_dpo` builds them: the policy loaded from the Stage-1 folder
    `sft_dir` (LoRA dropout 0), its pairs and collators; :attr:`DPOStage.reference` is not filled yet."""
    from pigeon_utils.checkpoints import load_upstream_model, read_model_config
    from pigeon_utils.data import open_dataset
    from pigeon_utils.worlds import load_backbone

    for name, pairs in (("pairs_train", pairs_train), ("pairs_valid", pairs_valid)):
        if pairs is None or len(pairs) == 0:
            raise ValueError(f"{name} is empty: Stage 2 needs preference pairs ({{'index', 'chosen', 'rejected'}} "
                             f"dicts, notebook 04)")
    sft_dir = Path(sft_dir)
    ours = (sft_dir / "pigeon_model.json").is_file()
    if not ours and not (sft_dir / "llama").is_dir():
        raise FileNotFoundError(f"{sft_dir}: no Stage-1 model here (neither pigeon_model.json nor the authors' "
                                f"checkpoint-N/llama/); Stage 2 starts from a Stage-1 model folder such as "
                                f"run_dir/sft/best (train Stage 1 first, notebook 03) or the authors' checkpoint-N/")
    accelerator = accelerator or make_accelerator(cfg, run.device)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    if backbone is None:
        backbone = load_backbone(run.preset, run.checkpoint_dir, device=accelerator.device)
    if ours:
        mcfg = dataclasses.replace(read_model_config(sft_dir), lora_dropout=0.0)
        model = PigeonModel(backbone, mcfg).load_trained(sft_dir).to(accelerator.device)
    else:  # the authors' released Stage-1 checkpoint (DPOPolicy switches the LoRA dropout off)
        model = load_upstream_model(backbone, sft_dir).to(accelerator.device)
    if cfg.gradient_checkpointing:
        model.lmm.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = DPOPolicy(model, frozen_dropout=cfg.frozen_dropout, keep_reference=not cfg.precompute_ref_log_probs)
    stage = DPOStage(cfg, policy, open_dataset(run.data_dir, run.scenario), pairs_train, pairs_valid,
                     max_samples=run.max_samples, progress=progress and accelerator.is_main_process)
    return stage, accelerator


def train_dpo(cfg: DPOConfig, run, pairs_train: Sequence[Mapping], pairs_valid: Sequence[Mapping], *,
              sft_dir: Path | str, backbone=None, out_dir: Path | str | None = None,
              resume: bool | str | Path = True, interrupt_after: Optional[int] = None, progress: bool = True,
              accelerator=None) -> TrainResult:
    """Train Stage 2 from the Stage-1 model folder `sft_dir` (e.g. ``run_dir/sft/best``) and return a
    :class:`~pigeon_utils.train.TrainResult` whose ``model`` is the :class:`PigeonModel` with its best weights.

    ``pairs_train`` / ``pairs_valid``: preference pairs of the training / validation split
    (:mod:`pigeon_utils.dpo_data`). ``run``: a :class:`~pigeon_utils.config.RunConfig` (dataset, checkpoint folder,
    device; ``max_samples`` cuts both pair lists). ``backbone``: an already loaded backbone — a fresh one, its LMM
    receives the LoRA (default: the preset's, from ``run.checkpoint_dir``). ``resume``, ``interrupt_after``: see
    :func:`pigeon_utils.train.train`; a resumed run reads the reference log-probs from ``out_dir``.
    """
    stage, accelerator = dpo_stage(cfg, run, pairs_train, pairs_valid, sft_dir=sft_dir, backbone=backbone,
                                   accelerator=accelerator, progress=progress)
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / "dpo"
    if cfg.precompute_ref_log_probs:
        cache = reference_cache(stage, accelerator, out_dir, sft_dir, reuse=bool(resume))
        stage.reference = {k: v.to(accelerator.device) for k, v in cache.items()}
    res = train(stage, out_dir, accelerator, resume=resume, interrupt_after=interrupt_after, progress=progress)
    return dataclasses.replace(res, model=res.model.pigeon)
