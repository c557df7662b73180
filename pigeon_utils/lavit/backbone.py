"""LaVIT-7B-v2 as a :class:`pigeon_utils.backbone.Backbone` (``load_backbone("lavit", ...)``).

:func:`load_lavit_backbone` reads a ``rain1011/LaVIT-7B-v2`` folder (spec §2.2) with no hub access:

* ``visual_tokenizer/*.bin`` -> :class:`LaVITVisualTokenizer` (EVA ViT-g + token merger + codebook) and
  :class:`LaVITDetokenizer` (``HighresVQDecoder`` + the codebook rows), through
  :class:`pigeon_utils.lavit.checkpoint.LaVITCheckpoint` (``torch.load(weights_only=True)``; strict where upstream is,
  required keys + reported extras where upstream loads non-strictly).
* ``language_model/`` -> ``LlamaForCausalLM`` and its text tokenizer (a ``tokenizer.json``, or the sentencepiece
  ``tokenizer.model`` LaVIT ships); Pigeon's ``<img>`` / ``<emb>`` must land on ids 32000 / 32001.
* ``highres_pixel_decoding/{unet,vae,scheduler}`` -> :class:`SDXLPixelDecoder`: an SDXL-architecture
  ``UNet2DConditionModel`` (``addition_embed_type="text_time"``), ``AutoencoderKL`` and a ``DDIMScheduler`` built from
  the saved scheduler config, run with classifier-free guidance against all-zero conditioning (spec §4.1 / §5.4).

Every missing file raises :class:`LaVITMissingFileError` (a :class:`~pigeon_utils.backbone.CheckpointError`) that
lists the expected layout and where to download it; a weight file whose keys do not fit its module raises
:class:`LaVITWeightsError` listing the missing / unexpected keys. Nothing is renamed, re-initialised or guessed.

Sizes: the real checkpoint has no config file for LaVIT's custom modules, so :meth:`LaVITConfig.real` is used unless
the folder holds ``lavit_config.json`` (written by :mod:`pigeon_utils.lavit.tiny_checkpoint` for the tiny test
checkpoint; see :func:`config_to_dict`).

dtype: fp32 by default on CPU, bf16 by default on CUDA. Like upstream, the custom modules then keep their
LayerNorms, position tables and codebook in fp32, hold Linear / Conv weights in the compute dtype, and run under
``torch.autocast``; the LLM, UNet and VAE are loaded directly in that dtype. ``load_in_8bit=True`` loads the LLM with
bitsandbytes (CUDA only), as Pigeon does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pigeon_utils.backbone import (
    Backbone,
    CheckpointError,
    Detokenizer,
    PixelDecoder,
    VisualTokenizer,
    VisualTokens,
)
from pigeon_utils.lavit.checkpoint import (
    EVA_FILE,
    EXPECTED_LAYOUT,
    HIGHRES_DECODER_FILE,
    HUB_ID,
    TOKENIZER_ENCODER_FILE,
    LaVITCheckpoint,
    LaVITCheckpointError,
    LoadReport,
    StateDictMismatchError,
)
from pigeon_utils.lavit.config import DecoderConfig, EVAConfig, LaVITConfig, TokenIds, TokenizerConfig
from pigeon_utils.lavit.decoder import HighresVQDecoder
from pigeon_utils.lavit.preprocess import LaVITImageProcessor
from pigeon_utils.lavit.tokenizer import DynamicVisualTokenizer, VectorQuantizer, sample_keep_decision
from pigeon_utils.prompts import EMB_TOKEN, IMG_TOKEN, LAVIT_LAYOUT, IdLayout

log = logging.getLogger(__name__)

#: Our own file (not in the published checkpoint): the sizes of the custom modules. Absent -> LaVITConfig.real().
CONFIG_FILE = "lavit_config.json"
LANGUAGE_MODEL_DIR = "language_model"
PIXEL_DECODING_DIR = "highres_pixel_decoding"
LLM_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_ROLE = "LLaMA text tokenizer: tokenizer.model (sentencepiece) or tokenizer.json"
#: diffusers weight file names, in the order diffusers tries them.
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                          "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
#: spec §4.1 / §5.4: 25 DDIM steps, decoder guidance 7.0.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.0


# ------------------------------------------------------------------------------------------ errors
class LaVITMissingFileError(LaVITCheckpointError, CheckpointError):
    """A file or folder of the LaVIT checkpoint layout is missing; the message lists the layout and the download."""


class LaVITWeightsError(StateDictMismatchError, CheckpointError):
    """A weight file's keys or shapes do not fit its module (never repaired by guessing)."""

    def __init__(self, message: str, path: Path, missing: Sequence[str] = (), unexpected: Sequence[str] = (),
                 shapes: dict | None = None) -> None:
        RuntimeError.__init__(self, message)
        self.path = Path(path)
        self.missing_keys, self.unexpected_keys = list(missing), list(unexpected)
        self.shape_mismatches = dict(shapes or {})

    @classmethod
    def from_mismatch(cls, err: StateDictMismatchError) -> "LaVITWeightsError":
        return cls(f"{err} -- the checkpoint file is damaged or from another model; re-download {HUB_ID}.",
                   err.path, err.missing_keys, err.unexpected_keys, err.shape_mismatches)


@contextlib.contextmanager
def _checkpoint_errors():
    """Re-raise the layout loader's errors as :class:`CheckpointError` subclasses (same message and fields)."""
    try:
        yield
    except LaVITMissingFileError:
        raise
    except LaVITCheckpointError as e:
        raise LaVITMissingFileError(e.root, e.missing, e.role) from None
    except LaVITWeightsError:
        raise
    except StateDictMismatchError as e:
        raise LaVITWeightsError.from_mismatch(e) from None


# ------------------------------------------------------------------------------------------ config file
def config_to_dict(config: LaVITConfig) -> dict[str, Any]:
    """:class:`LaVITConfig` -> JSON-able dict (the content of ``lavit_config.json``)."""
    return dataclasses.asdict(config)


#: nested dataclass fields of the size config
_NESTED = {LaVITConfig: {"tokenizer": TokenizerConfig, "decoder": DecoderConfig, "ids": TokenIds},
           TokenizerConfig: {"encoder": EVAConfig}}


def config_from_dict(data: dict[str, Any], source: str = CONFIG_FILE) -> LaVITConfig:
    """Inverse of :func:`config_to_dict`; an unknown field or a wrong type raises ``ValueError`` naming it."""

    def build(cls, raw: Any, where: str):
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: {where} must be an object, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown} in {where} ({cls.__name__})")
        nested = _NESTED.get(cls, {})
        kwargs = {k: build(nested[k], v, f"{where}.{k}") if k in nested else tuple(v) if isinstance(v, list) else v
                  for k, v in raw.items()}
        return cls(**kwargs)

    return build(LaVITConfig, data, "config")


def read_lavit_config(root: Path) -> LaVITConfig:
    """``<root>/lavit_config.json`` if present (tiny checkpoints), else the real LaVIT-7B-v2 sizes."""
    path = Path(root) / CONFIG_FILE
    if not path.is_file():
        return LaVITConfig.real()
    try:
        return config_from_dict(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid LaVIT size config: {e}. Delete it to use the real "
                              f"LaVIT-7B-v2 sizes, or rewrite it with pigeon_utils.lavit.tiny_checkpoint.") from e


def layout_for(config: LaVITConfig) -> IdLayout:
    """Pigeon's id layout for this LaVIT config (``prompts.LAVIT_LAYOUT`` with the config's ids and codebook size)."""
    ids = config.ids
    return dataclasses.replace(LAVIT_LAYOUT, img_id=ids.image_start, emb_id=ids.image_end,
                               visual_offset=ids.visual_offset, codebook_size=config.tokenizer.n_code,
                               pad_id=ids.pad)


# ------------------------------------------------------------------------------------------ dtype helpers
def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (the reference's dtype), fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def compute_context(device: torch.device, dtype: torch.dtype):
    """``torch.autocast`` in `dtype` on `device` for 16-bit runs (how upstream reconciles its mixed dtypes), else a
    no-op context."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def cast_linear_weights(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Upstream ``convert_weights_to_bf16``: only Linear / Conv1d / Conv2d weights and biases take `dtype`; norms,
    position tables, ``q_bias``/``v_bias`` and the codebook stay fp32."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(dtype)
    return module


# ------------------------------------------------------------------------------------------ visual tokenizer
class LaVITVisualTokenizer(VisualTokenizer):
    """PIL images -> LaVIT visual tokens: bicubic 224 px resize + CLIP normalisation, EVA, Gumbel keep decision,
    token merger, quantizer. ``patch_index`` is the raster index in the 16×16 (real) grid of 14-px patches."""

    def __init__(self, model: DynamicVisualTokenizer, config: LaVITConfig, device: torch.device,
                 dtype: torch.dtype, batch_size: int = 32) -> None:
        self.model = model
        self.config = config
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size = batch_size
        enc = config.tokenizer.encoder
        self.processor = LaVITImageProcessor(enc.img_size, config.image_mean, config.image_std)
        self.codebook_size = config.tokenizer.n_code
        self.grid = (enc.grid, enc.grid)
        self.patch_size = enc.patch_size

    @torch.no_grad()
    def tokenize(self, images: Sequence[Any], generator: torch.Generator | None = None,
                 keep: Tensor | None = None) -> VisualTokens:
        """Tokenize PIL images (or uint8 [H, W, 3] arrays).

        The keep decision is sampled (hard Gumbel, as upstream) with `generator` on the generator's own device, so a
        CPU generator gives the same tokens whatever device the model is on; ``keep`` [B, N] (0/1) fixes it instead.
        Returns CPU tensors.
        """
        images = list(images)
        if not images:
            raise ValueError("tokenize needs at least one image")
        n = self.grid[0] * self.grid[1]
        if keep is not None and tuple(keep.shape) != (len(images), n):
            raise ValueError(f"keep must have shape [B, N] = [{len(images)}, {n}], got {tuple(keep.shape)}")
        codes: list[Tensor] = []
        patches: list[Tensor] = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images[start:start + self.batch_size]).to(self.device)
            with compute_context(self.device, self.dtype):
                features = self.model.encode(pixels)
                if keep is None:
                    scores = self.model.predict_keep_scores(features)
                    gen_device = generator.device if generator is not None else scores.device
                    decision = sample_keep_decision(scores.to(gen_device), generator).to(self.device)
                else:
                    decision = keep[start:start + self.batch_size].to(self.device)
                out = self.model.tokenize_features(features, keep=decision)
            codes += [c.cpu() for c in out.code_ids]
            patches += [p.cpu() for p in out.patch_indices]
        return VisualTokens(codes=codes, patch_index=patches, grid=self.grid, patch_size=self.patch_size)


# ------------------------------------------------------------------------------------------ detokenizer
class LaVITDetokenizer(Detokenizer):
    """Code ids -> ``(prompt_embeds [B, 256, 2048], pooled [B, 1280])`` (real sizes): codebook rows, then the frozen
    ``HighresVQDecoder``.

    Only the real tokens (``mask``) are used, compacted in order (so a mask with holes behaves like Pigeon's
    "drop the masked tokens"); at most ``num_queries`` (256) per image are kept, the first ones, as Pigeon truncates.
    """

    def __init__(self, decoder: HighresVQDecoder, codebook: VectorQuantizer, dtype: torch.dtype = torch.float32
                 ) -> None:
        super().__init__()
        self.decoder = decoder.requires_grad_(False).eval()
        self.codebook = codebook.requires_grad_(False).eval()
        self.dtype = dtype
        cfg = decoder.cfg
        self.cond_dim, self.pooled_dim = cfg.prompt_dim, cfg.pooled_dim
        self.max_tokens = cfg.num_queries
        self.codebook_size = codebook.n_code

    def forward(self, codes: Tensor, mask: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if codes.dim() != 2 or mask.shape != codes.shape:
            raise ValueError(f"codes and mask must both be [B, T]; got {tuple(codes.shape)} and {tuple(mask.shape)}")
        mask = mask.to(torch.bool)
        real = codes[mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.codebook_size):
            raise ValueError(f"code ids must lie in [0, {self.codebook_size}) where mask is True; found "
                             f"{int(real.min())}..{int(real.max())} (pass codes, not LMM ids = "
                             f"{LAVIT_LAYOUT.visual_offset} + code)")
        mask = mask & (mask.long().cumsum(dim=1) <= self.max_tokens)
        rows = self.codebook(codes[mask])
        if weights is not None:  # straight-through keep values (1 forward) scale the codebook rows
            rows = rows * weights[mask].unsqueeze(-1).to(rows.dtype)
        device = rows.device
        with compute_context(device, self.dtype):
            cond, pooled = self.decoder(rows, mask.sum(dim=1))
        return cond, pooled


# ------------------------------------------------------------------------------------------ pixel decoder
def _read_json(path: Path, root: Path, role: str) -> dict:
    if not path.is_file():
        raise LaVITMissingFileError(root, path, role)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} ({role}) is not valid JSON: {e}; re-download {HUB_ID}.") from e


def _require_weights(folder: Path, root: Path, names: Sequence[str], role: str) -> None:
    if not any((folder / n).is_file() for n in names):
        raise LaVITMissingFileError(root, folder / names[0], f"{role} weights: one of {', '.join(names)}")


def _check_loading_info(info: dict, folder: Path, what: str) -> None:
    """Missing or mismatched keys -> :class:`LaVITWeightsError` (the library would have initialised them randomly);
    unexpected keys are logged."""
    missing = sorted(info.get("missing_keys", []))
    mismatched = info.get("mismatched_keys", [])
    unexpected = sorted(info.get("unexpected_keys", []))
    if missing or mismatched:
        shapes = {m[0]: (tuple(m[1]), tuple(m[2])) for m in mismatched if len(m) == 3}
        show = ", ".join(missing[:20]) + (f" ... (+{len(missing) - 20} more)" if len(missing) > 20 else "")
        raise LaVITWeightsError(
            f"{folder} does not fit {what}: {len(missing)} missing keys [{show or 'none'}]; "
            f"{len(mismatched)} shape mismatches {list(shapes.items())[:10]}. Refusing to initialise them "
            f"randomly; re-download {HUB_ID}.", folder, missing, unexpected, shapes)
    if unexpected:
        log.warning("%s: %d keys not used by %s: %s", folder, len(unexpected), what, unexpected[:20])


class SDXLPixelDecoder(PixelDecoder):
    """LaVIT's highres pixel decoder: SDXL-architecture UNet + ``AutoencoderKL`` + DDIM, hand-written loop.

    At every step the UNet sees ``[zeros | cond]`` (negative conditioning = all zeros, prompt and pooled embeds) and
    ``time_ids = (H, W, 0, 0, H, W)``; ``eps = eps_u + g (eps_c - eps_u)``. Latents are drawn on the generator's device
    (CPU when no generator is given) and moved, so a seeded CPU generator gives the same images on every device up to
    numerics. With ``lazy=True`` the weights are read at the first :meth:`decode` (configs are checked at once).
    """

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype, cond_dim: int, pooled_dim: int,
                 lazy: bool = False, default_steps: int = DEFAULT_STEPS, default_guidance: float = DEFAULT_GUIDANCE,
                 batch_size: int = 4) -> None:
        self.root = Path(root)
        self.device, self.dtype = torch.device(device), dtype
        self.default_steps, self.default_guidance = default_steps, default_guidance
        self.batch_size = batch_size
        self.folders = {name: self.root / PIXEL_DECODING_DIR / name for name in ("unet", "vae", "scheduler")}
        unet_cfg = _read_json(self.folders["unet"] / "config.json", self.root, "SDXL UNet config")
        self.vae_config = _read_json(self.folders["vae"] / "config.json", self.root, "VAE config")
        sched_path = self.folders["scheduler"] / "scheduler_config.json"
        self.scheduler_config = _read_json(sched_path, self.root, "DDIM scheduler config")
        _require_weights(self.folders["unet"], self.root, DIFFUSERS_WEIGHT_FILES, "SDXL UNet")
        _require_weights(self.folders["vae"], self.root, DIFFUSERS_WEIGHT_FILES, "VAE")
        self._check_unet_config(unet_cfg, cond_dim, pooled_dim)
        self.unet_config = unet_cfg
        self.vae_scale_factor = 2 ** (len(self.vae_config.get("block_out_channels", [0] * 4)) - 1)
        self.default_size = int(unet_cfg.get("sample_size", 128)) * self.vae_scale_factor
        self.unet = self.vae = None
        if not lazy:
            self.load()

    def _check_unet_config(self, cfg: dict, cond_dim: int, pooled_dim: int) -> None:
        path = self.folders["unet"] / "config.json"
        problems = []
        if cfg.get("addition_embed_type") != "text_time":
            problems.append(f"addition_embed_type={cfg.get('addition_embed_type')!r} (LaVIT's SDXL UNet: 'text_time')")
        if cfg.get("cross_attention_dim") != cond_dim:
            problems.append(f"cross_attention_dim={cfg.get('cross_attention_dim')} but the detokenizer gives "
                            f"{cond_dim}")
        want = pooled_dim + 6 * int(cfg.get("addition_time_embed_dim") or 0)
        if cfg.get("projection_class_embeddings_input_dim") != want:
            problems.append(f"projection_class_embeddings_input_dim={cfg.get('projection_class_embeddings_input_dim')}"
                            f" but pooled {pooled_dim} + 6 time ids × {cfg.get('addition_time_embed_dim')} = {want}")
        if problems:
            raise CheckpointError(f"{path} does not fit LaVIT's detokenizer: " + "; ".join(problems)
                                  + f". The highres_pixel_decoding/ folder must come from {HUB_ID}.")

    def load(self) -> "SDXLPixelDecoder":
        """Read the UNet and VAE weights (strict: missing or mismatched keys raise :class:`LaVITWeightsError`)."""
        if self.unet is not None:
            return self
        from diffusers import AutoencoderKL, UNet2DConditionModel

        def read(cls, folder: Path):
            # diffusers prefers safetensors; say which file is there (a .bin is read with weights_only=True)
            safe = any((folder / n).is_file() for n in DIFFUSERS_WEIGHT_FILES if ".safetensors" in n)
            model, info = cls.from_pretrained(folder, torch_dtype=self.dtype, local_files_only=True,
                                              output_loading_info=True, use_safetensors=safe)
            _check_loading_info(info, folder, cls.__name__)
            return model

        unet = read(UNet2DConditionModel, self.folders["unet"])
        vae = read(AutoencoderKL, self.folders["vae"])
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        return self

    def make_scheduler(self):
        """A fresh ``DDIMScheduler`` from the saved config (upstream fixes the class to DDIM whatever was saved)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler_config)

    def _latent_shape(self, n: int, height: int | None, width: int | None) -> tuple[int, int, int, int]:
        h, w = int(height or self.default_size), int(width or self.default_size)
        return n, self.unet.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor

    def draw_noise(self, n: int, generator: torch.Generator | None = None, height: int | None = None,
                   width: int | None = None, **_) -> Tensor:
        self.load()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(self._latent_shape(n, height, width), generator=generator, device=gen_device,
                           dtype=torch.float32)

    @torch.no_grad()
    def decode(self, cond: Tensor, pooled: Tensor, generator: torch.Generator | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               height: int | None = None, width: int | None = None, batch_size: int | None = None,
               noise: Tensor | None = None) -> Tensor:
        """Conditioning -> images float32 [B, 3, H, W] in [0, 1] on the CPU (default 1024² for the real UNet)."""
        self.load()
        steps = int(num_inference_steps or self.default_steps)
        g = float(self.default_guidance if guidance_scale is None else guidance_scale)
        h, w = int(height or self.default_size), int(width or self.default_size)
        if h % self.vae_scale_factor or w % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {h}×{w}")
        if cond.dim() != 3 or pooled.dim() != 2 or cond.shape[0] != pooled.shape[0]:
            raise ValueError(f"cond must be [B, T, D] and pooled [B, D'] with the same B; got "
                             f"{tuple(cond.shape)} and {tuple(pooled.shape)}")
        b = cond.shape[0]
        noise = self.draw_noise(b, generator, height=h, width=w) if noise is None else noise
        want = self._latent_shape(b, h, w)
        if tuple(noise.shape) != want:
            raise ValueError(f"noise must have shape {want} for {b} images of {h}×{w}, got {tuple(noise.shape)}")
        step = int(batch_size or self.batch_size)
        out = [self._denoise(cond[i:i + step], pooled[i:i + step], noise[i:i + step], steps, g, h, w)
               for i in range(0, b, step)]
        return torch.cat(out)

    def _denoise(self, cond: Tensor, pooled: Tensor, noise: Tensor, steps: int, g: float, h: int, w: int) -> Tensor:
        dev, dt = self.device, self.dtype
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(steps, device=dev)
        latents = noise.to(dev) * scheduler.init_noise_sigma
        cond, pooled = cond.to(dev, dt), pooled.to(dev, dt)
        b = cond.shape[0]
        time_ids = torch.tensor([h, w, 0, 0, h, w], device=dev, dtype=dt).expand(b, 6)
        guided = g != 1.0
        if guided:  # [uncond = zeros | cond]
            cond = torch.cat([torch.zeros_like(cond), cond])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
            time_ids = torch.cat([time_ids, time_ids])
        added = {"text_embeds": pooled, "time_ids": time_ids}
        for t in scheduler.timesteps:
            x = torch.cat([latents, latents]) if guided else latents
            x = scheduler.scale_model_input(x, t).to(dt)
            eps = self.unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added).sample.float()
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + g * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents).prev_sample
        vae_cfg = self.vae.config
        z = latents / vae_cfg.scaling_factor
        if getattr(vae_cfg, "shift_factor", None):
            z = z + vae_cfg.shift_factor
        images = self.vae.decode(z.to(dt)).sample.float()
        return (images / 2 + 0.5).clamp(0, 1).cpu()


# ------------------------------------------------------------------------------------------ LLM + text tokenizer
def load_language_model(root: Path, device: torch.device, dtype: torch.dtype, load_in_8bit: bool = False,
                        min_vocab: int | None = None) -> nn.Module:
    """``LlamaForCausalLM`` from ``<root>/language_model`` (local files only), frozen, in eval mode.

    Missing / shape-mismatched weights raise :class:`LaVITWeightsError`; unexpected keys are logged. The vocabulary
    must cover `min_vocab` ids (LaVIT: 32002 + 16384 = 48386).
    """
    from transformers import LlamaForCausalLM

    folder = Path(root) / LANGUAGE_MODEL_DIR
    _read_json(folder / "config.json", root, "LlamaForCausalLM config")
    _require_weights(folder, root, LLM_WEIGHT_FILES, "LlamaForCausalLM")
    kw: dict[str, Any] = dict(dtype=dtype, local_files_only=True, output_loading_info=True)
    if load_in_8bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("load_in_8bit=True needs the bitsandbytes package (pip install bitsandbytes, CUDA "
                              "only); load in bf16 instead with load_in_8bit=False.")
        if device.type != "cuda":
            raise ValueError(f"load_in_8bit=True needs a CUDA device (bitsandbytes LLM.int8), got {device}")
        from transformers import BitsAndBytesConfig

        kw.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                  device_map={"": device.index if device.index is not None else torch.cuda.current_device()})
    model, info = LlamaForCausalLM.from_pretrained(folder, **kw)
    _check_loading_info(info, folder, "LlamaForCausalLM")
    if min_vocab is not None and model.config.vocab_size < min_vocab:
        raise CheckpointError(f"{folder / 'config.json'}: vocab_size {model.config.vocab_size} < {min_vocab} "
                              f"= the id layout's text + [IMG] + [/IMG] + visual ids; this is not a LaVIT LLM.")
    if not load_in_8bit:
        model = model.to(device)
    return model.eval().requires_grad_(False)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _missing_sentencepiece_modules() -> list[str]:
    """What transformers needs to read a sentencepiece ``tokenizer.model`` and is not installed."""
    return [pkg for mod, pkg in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf"))
            if not _importable(mod)]


def load_text_tokenizer(root: Path, layout: IdLayout):
    """The LLM's text tokenizer (``tokenizer.json`` preferred, else LaVIT's sentencepiece ``tokenizer.model``), with
    Pigeon's ``<img>`` / ``<emb>`` added; they must get ``layout.img_id`` / ``layout.emb_id`` (32000 / 32001).

    Left padding with pad = ``</s>`` (id ``layout.pad_id``), as the reference.
    """
    from transformers import AutoTokenizer

    folder = Path(root) / LANGUAGE_MODEL_DIR
    present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not present:
        raise LaVITMissingFileError(root, folder / "tokenizer.model", TOKENIZER_ROLE)
    if present == ["tokenizer.model"]:
        lacking = _missing_sentencepiece_modules()
        if lacking:
            raise ImportError(f"{folder / 'tokenizer.model'} is a sentencepiece model; reading it needs "
                              f"{' and '.join(lacking)} (pip install sentencepiece protobuf). Alternatively save the "
                              f"tokenizer once as tokenizer.json in {folder}.")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vocab = tok.get_vocab()
    for token, want in ((IMG_TOKEN, layout.img_id), (EMB_TOKEN, layout.emb_id)):
        if token not in vocab:
            if len(tok) != want:
                raise CheckpointError(
                    f"{folder}: the text tokenizer has {len(tok)} entries, so adding {token!r} would give id "
                    f"{len(tok)}, not {want} as the LaVIT id layout needs (LaVIT's LLaMA tokenizer has 32000).")
            tok.add_tokens([token])
            vocab = tok.get_vocab()
        if vocab[token] != want:
            raise CheckpointError(f"{folder}: {token!r} has id {vocab[token]} in the text tokenizer, expected {want}")
    if tok.eos_token_id != layout.pad_id:
        raise CheckpointError(f"{folder}: eos token id {tok.eos_token_id}, expected {layout.pad_id} ('</s>', "
                              f"the pad id of the layout)")
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


# ------------------------------------------------------------------------------------------ entry point
def check_layout(ckpt: LaVITCheckpoint) -> None:
    """Check that every file the backbone reads exists (no weights are read); the first missing one raises
    :class:`LaVITMissingFileError` with the expected layout and the download source."""
    root = ckpt.root
    with _checkpoint_errors():
        ckpt.require_dirs(("language_model", "highres_pixel_decoding"))
        for folder, stem in (EVA_FILE, TOKENIZER_ENCODER_FILE, HIGHRES_DECODER_FILE):
            ckpt.weight_file(folder, stem, role=f"LaVIT custom weights {stem}")
    lm = root / LANGUAGE_MODEL_DIR
    if not (lm / "config.json").is_file():
        raise LaVITMissingFileError(root, lm / "config.json", "LlamaForCausalLM config")
    _require_weights(lm, root, LLM_WEIGHT_FILES, "LlamaForCausalLM")
    if not any((lm / n).is_file() for n in TOKENIZER_FILES):
        raise LaVITMissingFileError(root, lm / "tokenizer.model", TOKENIZER_ROLE)
    pd = root / PIXEL_DECODING_DIR
    for name, role in (("unet", "SDXL UNet"), ("vae", "VAE")):
        if not (pd / name / "config.json").is_file():
            raise LaVITMissingFileError(root, pd / name / "config.json", f"{role} config")
        _require_weights(pd / name, root, DIFFUSERS_WEIGHT_FILES, role)
    if not (pd / "scheduler" / "scheduler_config.json").is_file():
        raise LaVITMissingFileError(root, pd / "scheduler" / "scheduler_config.json", "DDIM scheduler config")


def load_lavit_backbone(checkpoint_dir: str | Path, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, load_in_8bit: bool = False,
                        lazy_pixel_decoder: bool = False) -> Backbone:
    """Load the whole LaVIT-7B-v2 backbone from a local checkpoint folder (spec §2.2 layout), with no hub access.

    `dtype` defaults to bf16 on CUDA and fp32 on CPU. `load_in_8bit` loads the LLM with bitsandbytes (CUDA only).
    `lazy_pixel_decoder` defers reading the UNet / VAE weights to the first decode (training needs none).
    ``extras``: ``config`` (:class:`LaVITConfig`), ``dtype``, ``load_reports`` (what each custom weight file filled,
    with its unexpected keys).
    """
    root = Path(checkpoint_dir)
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if not root.is_dir():
        raise LaVITMissingFileError(root, root, "the checkpoint folder itself")
    config = read_lavit_config(root)
    layout = layout_for(config)
    with _checkpoint_errors():
        ckpt = LaVITCheckpoint(root, config)
        check_layout(ckpt)  # every file first, before reading gigabytes of weights
        tok_model, reports = ckpt.load_visual_tokenizer(for_understanding=False)
        decoder = ckpt.load_highres_decoder()
    for rep in reports:
        if rep.unexpected_keys:
            log.warning("%s: %d unexpected keys (reported, not used): %s", rep.path, len(rep.unexpected_keys),
                        rep.unexpected_keys[:20])
    codebook = VectorQuantizer(config.tokenizer.n_code, config.tokenizer.code_dim)
    codebook.load_state_dict(tok_model.quantize.state_dict())
    if dtype != torch.float32:
        cast_linear_weights(tok_model, dtype)
        cast_linear_weights(decoder, dtype)
    tok_model = tok_model.to(device).requires_grad_(False).eval()
    detok = LaVITDetokenizer(decoder, codebook, dtype).to(device)
    text_tok = load_text_tokenizer(root, layout)
    llm = load_language_model(root, device, dtype, load_in_8bit, min_vocab=layout.vocab_size)
    pixel = SDXLPixelDecoder(root, device, dtype, detok.cond_dim, detok.pooled_dim, lazy=lazy_pixel_decoder)
    return Backbone(
        preset="lavit",
        tokenizer=LaVITVisualTokenizer(tok_model, config, device, dtype),
        lmm=llm,
        text_tokenizer=text_tok,
        layout=layout,
        detokenizer=detok,
        pixel_decoder=pixel,
        checkpoint_dir=root,
        extras={"config": config, "dtype": dtype, "load_reports": list(reports)},
    )


__all__ = [
    "CONFIG_FILE",
    "EXPECTED_LAYOUT",
    "LaVITDetokenizer",
    "LaVITMissingFileError",
    "LaVITVisualTokenizer",
    "LaVITWeightsError",
    "LoadReport",
    "SDXLPixelDecoder",
    "cast_linear_weights",
    "check_layout",
    "compute_context",
    "config_from_dict",
    "config_to_dict",
    "layout_for",
    "load_language_model",
    "load_lavit_backbone",
    "load_text_tokenizer",
    "read_lavit_config",
]
