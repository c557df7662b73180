"""The personalization model of Pigeon (docs/algorithm.md §3.1-3.4, §5.2): LMM + LoRA, adapter MLP, mask generator.

:class:`PigeonModel` wraps one :class:`~pigeon_utils.backbone.Backbone`:

* the LMM (``LlamaForCausalLM``) with LoRA adapters from ``peft`` (paper: r 8, α 16, dropout 0.05 on
  ``q_proj``/``v_proj``) — the base weights stay frozen;
* the adapter MLP (:class:`~pigeon_utils.adapter.PigeonAdapter`): mean detokenizer embedding of the masked
  reference → one LMM input embedding ``E`` written at the ``<emb>`` slot (trainable);
* the mask generator (:class:`~pigeon_utils.masking.MutualMaskGenerator`): keep / mask decisions for the
  history tokens (ratio α_h = ``hist_mask_ratio``) and the reference tokens (ratio α_r = ``ref_mask_ratio``).
  With ``straight_through=True`` (our default, the fix of docs/algorithm.md §2.8) the keep values multiply the history
  embeddings and weight the reference tokens in the detokenizer, so the LMM loss trains the generator; with
  ``straight_through=False`` the reference behaviour is reproduced (hard mask; the generator is frozen);
* the frozen visual tokenizer / detokenizer of the backbone.

:meth:`PigeonModel.forward` computes the Stage-1 loss on one :class:`PigeonBatch` (docs/algorithm.md §3.3-3.4); it returns the
*sum* of the token cross-entropies and the number of supervised tokens, so the training loop can average over the
whole (possibly multi-process) batch. :meth:`PigeonModel.sweep_embeddings` gives the inputs of generation at
several α_r at once (:mod:`pigeon_utils.generation` samples the visual tokens) and :meth:`PigeonModel.decode` turns
visual tokens into images.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pigeon_utils.adapter import PigeonAdapter
from pigeon_utils.config import from_dict_strict
from pigeon_utils.keep import (HIST_TYPE, MASK_TYPES, TARGET_TYPE, KeepMask, check_ratio, generate_keep_mask,
                               gumbel_topk_keep, keep_probabilities)
from pigeon_utils.masking import MutualMaskGenerator
from pigeon_utils.sequence import EMB, IGNORE_INDEX, AssembledBatch, MaskLayout, reference_codes

__all__ = ["PigeonModelConfig", "PigeonBatch", "PigeonOutput", "PigeonModel"]


@dataclass
class PigeonModelConfig:
    """What is built around the backbone. Defaults are the paper's (docs/algorithm.md §2.1, §3.1, run_sft.sh).

    ``adapter_hidden``: hidden width of the adapter MLP (512 upstream; its input is the detokenizer's
    conditioning width, its output the LMM width). ``mask_*``: mask generator heads / layers / dropout / FFN width
    (PyTorch's default 2048 upstream); ``mask_encoder_dropout``: the dropout inside its transformer layer (PyTorch's
    default 0.1 upstream; 0 makes a run without any dropout possible). ``hist_mask_ratio``: α_h. ``mask_type``: ``"mutual"`` | ``"random"`` |
    ``"none"`` (docs/algorithm.md §2.9). ``straight_through``: see the module docstring.
    """

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    adapter_hidden: int = 512
    adapter_dropout: float = 0.2
    mask_type: str = "mutual"
    mask_heads: int = 4
    mask_layers: int = 1
    mask_dropout: float = 0.2
    mask_feedforward: int = 2048
    mask_encoder_dropout: float = 0.1
    hist_mask_ratio: float = 0.2
    straight_through: bool = True

    def __post_init__(self):
        self.lora_target_modules = tuple(self.lora_target_modules)
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type={self.mask_type!r}: expected one of {MASK_TYPES}")
        if int(self.lora_r) != self.lora_r or self.lora_r < 1:
            raise ValueError(f"lora_r must be a positive integer, got {self.lora_r!r}")
        if not (0.0 <= self.lora_dropout < 1.0):
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        check_ratio("hist_mask_ratio", self.hist_mask_ratio)

    def build_mask_generator(self, hidden: int) -> MutualMaskGenerator:
        """A freshly initialised mask generator of this configuration for an LMM of width `hidden`."""
        gen = MutualMaskGenerator(hidden, num_heads=self.mask_heads, num_layers=self.mask_layers,
                                  drop_prob=self.mask_dropout, dim_feedforward=self.mask_feedforward)
        _set_dropout(gen.encoder, self.mask_encoder_dropout)
        return gen

    @classmethod
    def from_dict(cls, d: dict) -> "PigeonModelConfig":
        return from_dict_strict(cls, d)


@dataclass
class PigeonBatch:
    """A collated batch: the LMM sequences (:class:`~pigeon_utils.sequence.AssembledBatch`), the mask generator's
    layout (:class:`~pigeon_utils.sequence.MaskLayout`), the Exp(1) noise of the Gumbel top-k (``noise`` [B, L],
    drawn per sample from a per-sample seed so a sample's masks do not depend on the batch it lands in; None:
    torch's RNG) and the dataset ``index`` [B] of each sample."""

    seq: AssembledBatch
    masks: MaskLayout
    noise: Optional[Tensor] = None
    index: Optional[Tensor] = None

    def to(self, device, non_blocking: bool = False) -> "PigeonBatch":
        return PigeonBatch(seq=self.seq.to(device), masks=self.masks.to(device),
                           noise=None if self.noise is None else self.noise.to(device),
                           index=None if self.index is None else self.index.to(device))

    def __len__(self) -> int:
        return self.seq.input_ids.shape[0]


@dataclass
class PigeonOutput:
    """``loss_sum``: Σ of the token cross-entropies over the batch's supervised tokens; ``num_tokens``: their
    number (the loss of docs/algorithm.md §3.4 is ``loss_sum / num_tokens`` over the whole batch); ``keep``: the masks."""

    loss_sum: Tensor
    num_tokens: Tensor
    keep: KeepMask

    @property
    def loss(self) -> Tensor:
        return self.loss_sum / self.num_tokens.clamp_min(1)


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _set_dropout(module: nn.Module, p: float) -> None:
    """Set every dropout probability inside `module` (Dropout layers and attention dropout) to `p`."""
    if not (0.0 <= float(p) < 1.0):
        raise ValueError(f"dropout probability must lie in [0, 1), got {p!r}")
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = float(p)
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = float(p)


class PigeonModel(nn.Module):
    """LMM + LoRA, adapter MLP and mask generator around a frozen backbone (see the module docstring)."""

    def __init__(self, backbone, config: PigeonModelConfig | None = None):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.config = config = config or PigeonModelConfig()
        self.backbone = backbone  # plain attribute: tokenizer, pixel decoder, layout (not a submodule)
        self.layout = backbone.layout
        lmm = backbone.lmm
        _freeze(lmm)
        names = {n.rsplit(".", 1)[-1] for n, _ in lmm.named_modules()}
        missing = [m for m in config.lora_target_modules if m not in names]
        if missing:
            raise ValueError(f"lora_target_modules {missing} are not modules of the LMM "
                             f"({type(lmm).__name__}); e.g. {sorted(n for n in names if n.endswith('proj'))}")
        lora = LoraConfig(r=int(config.lora_r), lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_target_modules), bias="none", task_type="CAUSAL_LM")
        self.lmm = get_peft_model(lmm, lora)
        hidden = self.lmm.get_input_embeddings().embedding_dim
        self.detokenizer = backbone.detokenizer
        _freeze(self.detokenizer)
        self.detokenizer.eval()
        self.adapter = PigeonAdapter(in_dim=self.detokenizer.cond_dim, hid_dim=config.adapter_hidden,
                                     out_dim=hidden, drop_prob=config.adapter_dropout)
        self.mask_generator: Optional[MutualMaskGenerator] = None
        if config.mask_type == "mutual":
            self.mask_generator = config.build_mask_generator(hidden)
            if not config.straight_through:  # the reference: no gradient ever reaches it (docs/algorithm.md §2.8)
                _freeze(self.mask_generator)
        device = self.lmm.get_input_embeddings().weight.device
        self.adapter.to(device)
        if self.mask_generator is not None:
            self.mask_generator.to(device)

    # ----------------------------------------------------------------------------------------- helpers
    def train(self, mode: bool = True):
        super().train(mode)
        self.detokenizer.eval()  # frozen part: never in train mode
        return self

    @property
    def device(self) -> torch.device:
        return self.lmm.get_input_embeddings().weight.device

    def parameter_summary(self) -> dict[str, dict[str, int]]:
        """Trainable / total parameters per component (the table of docs/algorithm.md §3.1)."""
        parts = {"lmm (LoRA)": self.lmm, "adapter": self.adapter, "detokenizer": self.detokenizer}
        if self.mask_generator is not None:
            parts["mask_generator"] = self.mask_generator
        return {k: {"trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
                    "total": sum(p.numel() for p in m.parameters())} for k, m in parts.items()}

    def token_embeddings(self, ids: Tensor) -> Tensor:
        """The LMM's (frozen) input embeddings of ``ids``."""
        return self.lmm.get_input_embeddings()(ids)

    def keep_mask(self, masks: MaskLayout, ref_mask_ratio: float, *, inference: bool,
                  noise: Optional[Tensor] = None, hist_mask_ratio: Optional[float] = None) -> KeepMask:
        """Keep decisions for history (α_h) and reference (α_r) tokens (docs/algorithm.md §2.3-2.5).

        The generator reads ``e_i`` = the LMM input embeddings of the layout's ids (fp32, docs/algorithm.md §8.19)."""
        cfg = self.config
        alpha_h = cfg.hist_mask_ratio if hist_mask_ratio is None else hist_mask_ratio
        e = None
        if cfg.mask_type == "mutual":
            e = self.token_embeddings(masks.ids).float()
        return generate_keep_mask(cfg.mask_type, type_ids=masks.type_ids, padding_mask=masks.padding_mask,
                                  ref_mask_ratio=ref_mask_ratio, hist_mask_ratio=alpha_h,
                                  mask_generator=self.mask_generator, token_embeds=e,
                                  position_ids=masks.position_ids, inference=inference,
                                  straight_through=cfg.straight_through, hist_exponential=noise,
                                  target_exponential=noise)

    def reference_embedding(self, masks: MaskLayout, keep: Tensor) -> Tensor:
        """``E = Adapter(mean_T Detokenizer(kept reference codes))`` [B, hidden] (docs/algorithm.md §3.2).

        With straight-through masks the keep values (1 in the forward pass) weight the reference tokens'
        embeddings in the frozen detokenizer, so the generator's reference scores get a gradient; otherwise the
        detokenizer runs without autograd, as upstream.
        """
        codes, mask, weights = reference_codes(masks, keep, self.layout)
        use_weights = self.config.straight_through and weights.requires_grad
        with torch.set_grad_enabled(torch.is_grad_enabled() and use_weights):
            cond, _ = self.detokenizer(codes, mask, weights=weights if use_weights else None)
            r = cond.mean(1)
        return self.adapter(r)

    def input_embeddings(self, batch: PigeonBatch, ref_mask_ratio: float, *, inference: bool,
                         hist_mask_ratio: Optional[float] = None) -> tuple[Tensor, KeepMask]:
        """The LMM's ``inputs_embeds`` [B, T, D]: token embeddings × keep (masked history → zero vectors,
        attention kept), and the adapter output ``E`` at the ``<emb>`` slot."""
        keep = self.keep_mask(batch.masks, ref_mask_ratio, inference=inference, noise=batch.noise,
                              hist_mask_ratio=hist_mask_ratio)
        x = self.token_embeddings(batch.seq.input_ids)
        x = x * batch.seq.keep_scale(keep.keep).unsqueeze(-1).to(x.dtype)
        e = self.reference_embedding(batch.masks, keep.keep).to(x.dtype)
        x = torch.where((batch.seq.token_type == EMB).unsqueeze(-1), e.unsqueeze(1), x)
        return x, keep

    @torch.no_grad()
    def sweep_keep(self, masks: MaskLayout, ref_mask_ratios: Sequence[float], *, noise: Optional[Tensor] = None,
                   hist_mask_ratio: Optional[float] = None) -> Tensor:
        """Inference keep decisions for several α_r at once: [R, B, L] (row r ↔ ``ref_mask_ratios[r]``).

        The mask generator scores the tokens once (the scores do not depend on α_r); the history top-k (α_h) is
        drawn once, so every α_r sees the same history mask; the reference top-k is taken per α_r. Each slice
        equals :meth:`keep_mask` at that α_r with ``inference=True`` (the mask types without a generator call it).
        """
        if len(ref_mask_ratios) == 0:
            raise ValueError("sweep_keep needs at least one reference mask ratio α_r")
        ratios = [check_ratio("ref_mask_ratio", r) for r in ref_mask_ratios]
        cfg = self.config
        if cfg.mask_type != "mutual":
            return torch.stack([self.keep_mask(masks, r, inference=True, noise=noise,
                                               hist_mask_ratio=hist_mask_ratio).keep for r in ratios])
        alpha_h = check_ratio("hist_mask_ratio", cfg.hist_mask_ratio if hist_mask_ratio is None else hist_mask_ratio)
        e = self.token_embeddings(masks.ids).float()
        scores = self.mask_generator.score(e, masks.padding_mask, masks.position_ids, masks.type_ids)
        hist_q, target_q = keep_probabilities(scores.cos_sim, masks.type_ids, inference=True)
        hist, _ = gumbel_topk_keep(hist_q, masks.type_ids == HIST_TYPE, alpha_h, exponential=noise,
                                   straight_through=False)
        target = masks.type_ids == TARGET_TYPE
        return torch.stack([hist + gumbel_topk_keep(target_q, target, r, exponential=noise, straight_through=False)[0]
                            for r in ratios])

    @torch.no_grad()
    def sweep_embeddings(self, batch: PigeonBatch, ref_mask_ratios: Sequence[float], *,
                         hist_mask_ratio: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Inference inputs for several reference mask ratios α_r at once (the α_r sweep of docs/algorithm.md §5.3).

        Everything but the ``<emb>`` slot is the same for every α_r (:meth:`sweep_keep`). Returns ``(x, E, keep)``:
        ``x`` [B, T, D] the token embeddings with masked history tokens zeroed (the ``<emb>`` slot still holds its
        token embedding); ``E`` [B, R, D] the adapter output for each α_r, from one detokenizer call over all
        ``B × R`` masked references; ``keep`` [R, B, L]. ``x`` with ``E[:, r]`` written at the slot equals
        :meth:`input_embeddings` at α_r = ``ref_mask_ratios[r]`` with ``inference=True``.
        """
        keep = self.sweep_keep(batch.masks, ref_mask_ratios, noise=batch.noise, hist_mask_ratio=hist_mask_ratio)
        n_r, b = keep.shape[:2]
        x = self.token_embeddings(batch.seq.input_ids)
        x = x * batch.seq.keep_scale(keep[0]).unsqueeze(-1).to(x.dtype)
        refs = [reference_codes(batch.masks, k, self.layout)[:2] for k in keep]
        width = max(c.shape[1] for c, _ in refs)
        codes = torch.cat([F.pad(c, (0, width - c.shape[1])) for c, _ in refs])  # [R·B, K], ratio-major
        mask = torch.cat([F.pad(m, (0, width - m.shape[1])) for _, m in refs])
        cond, _ = self.detokenizer(codes, mask)
        e = self.adapter(cond.mean(1)).to(x.dtype).reshape(n_r, b, -1).transpose(0, 1)
        return x, e, keep

    # ----------------------------------------------------------------------------------------- training
    def forward(self, batch: PigeonBatch, ref_mask_ratio: float) -> PigeonOutput:
        """Stage-1 masked preference reconstruction (docs/algorithm.md §3.3-3.4) for one batch at α_r = ``ref_mask_ratio``.

        Cross-entropy over the full vocabulary on the target's visual tokens and ``[/IMG]`` only; the LM head runs
        on the supervised positions only (the rest of the sequence needs no logits).
        """
        seq = batch.seq
        x, keep = self.input_embeddings(batch, ref_mask_ratio, inference=False)
        base = self.lmm.get_base_model()  # LoRA layers are injected in place
        h = base.model(inputs_embeds=x, attention_mask=seq.attention_mask, position_ids=seq.position_ids,
                       use_cache=False).last_hidden_state
        labels = seq.labels[:, 1:]
        sel = labels != IGNORE_INDEX
        logits = base.lm_head(h[:, :-1][sel]).float()
        loss_sum = F.cross_entropy(logits, labels[sel], reduction="sum")
        return PigeonOutput(loss_sum=loss_sum, num_tokens=sel.sum(), keep=keep)

    def sequence_log_probs(self, inputs_embeds: Tensor, seq: AssembledBatch) -> Tensor:
        """Per row, the summed log-probability of its supervised tokens (``seq.labels``), [B] float32: the
        full-vocabulary log-softmax of the LMM + LoRA on ``inputs_embeds`` [B, T, D] — the sequence score of
        DPO (docs/algorithm.md §4.4); ``−Σ`` over rows is :meth:`forward`'s ``loss_sum`` on the same inputs."""
        base = self.lmm.get_base_model()
        h = base.model(inputs_embeds=inputs_embeds, attention_mask=seq.attention_mask,
                       position_ids=seq.position_ids, use_cache=False).last_hidden_state
        labels = seq.labels[:, 1:]
        sel = labels != IGNORE_INDEX
        logits = base.lm_head(h[:, :-1][sel]).float()
        token_lp = -F.cross_entropy(logits, labels[sel], reduction="none")
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)[sel]
        out = torch.zeros(labels.shape[0], dtype=token_lp.dtype, device=token_lp.device)
        return out.index_add(0, rows, token_lp)

    # ----------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def decode(self, codes: Sequence[Tensor], generator: Optional[torch.Generator] = None, **kw) -> Tensor:
        """Codes per image → images float [B, 3, H, W] in [0, 1] (detokenizer + pixel decoder, docs/algorithm.md §5.4)."""
        return self.backbone.decode_codes([c.to(self.device) for c in codes], generator=generator, **kw)

    # ----------------------------------------------------------------------------------------- files
    def trainable_state(self) -> dict[str, dict[str, Tensor]]:
        """The trained parts: LoRA weights (peft names), adapter and mask generator state dicts."""
        from peft import get_peft_model_state_dict

        out = {"lora": get_peft_model_state_dict(self.lmm), "adapter": self.adapter.state_dict()}
        if self.mask_generator is not None:
            out["mask_generator"] = self.mask_generator.state_dict()
        return out

    def save_pretrained(self, folder: Path | str) -> Path:
        """``lora/`` (peft ``save_pretrained``), ``adapter.safetensors``, ``mask_generator.safetensors`` and
        ``pigeon_model.json`` (the :class:`PigeonModelConfig`) into `folder` (docs/algorithm.md §3.6, in safetensors)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.lmm.save_pretrained(str(folder / "lora"))
        state = self.trainable_state()
        for name in ("adapter", "mask_generator"):
            if name in state:
                save_file({k: v.detach().cpu().contiguous() for k, v in state[name].items()},
                          str(folder / f"{name}.safetensors"))
        (folder / "pigeon_model.json").write_text(json.dumps(asdict(self.config), indent=1))
        return folder

    def load_trained(self, folder: Path | str) -> "PigeonModel":
        """Load what :meth:`save_pretrained` wrote (strictly; a missing file or key names the file)."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights
        from safetensors.torch import load_file

        folder = Path(folder)
        lora_dir = folder / "lora"
        if not lora_dir.is_dir():
            raise FileNotFoundError(f"{lora_dir}: LoRA folder missing from the Pigeon checkpoint {folder}")
        weights = load_peft_weights(str(lora_dir), device=str(self.device))
        res = set_peft_model_state_dict(self.lmm, weights)
        if getattr(res, "unexpected_keys", None):
            raise ValueError(f"{lora_dir}: unexpected LoRA keys {res.unexpected_keys[:5]}")
        parts = [("adapter", self.adapter)] + ([("mask_generator", self.mask_generator)]
                                               if self.mask_generator is not None else [])
        for name, module in parts:
            path = folder / f"{name}.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing from the Pigeon checkpoint {folder}")
            module.load_state_dict(load_file(str(path), device=str(self.device)), strict=True)
        return self
