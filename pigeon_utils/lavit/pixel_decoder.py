"""LaVIT's highres pixel decoder: conditioning -> images, with an SDXL-architecture UNet, a VAE and DDIM.

``<checkpoint>/highres_pixel_decoding/{unet,vae,scheduler}`` -> :class:`SDXLPixelDecoder`: an SDXL-architecture
``UNet2DConditionModel`` (``addition_embed_type="text_time"``), ``AutoencoderKL`` and a ``DDIMScheduler`` built from
the saved scheduler config, run with classifier-free guidance against all-zero conditioning (docs/algorithm.md §5.4).
:func:`check_pixel_decoder_files` checks the diffusers folders without reading weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pigeon_utils.backbone import CheckpointError, PixelDecoder
from pigeon_utils.lavit.checkpoint import HUB_ID
from pigeon_utils.lavit.errors import LaVITMissingFileError, check_loading_info, read_json, require_weights

PIXEL_DECODING_DIR = "highres_pixel_decoding"
#: diffusers weight file names, in the order diffusers tries them.
DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                          "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
#: docs/algorithm.md §5.4: 25 DDIM steps, decoder guidance 7.0.
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.0


def check_pixel_decoder_files(root: Path) -> None:
    """The UNet and VAE configs and weights and the scheduler config exist under ``<root>/highres_pixel_decoding``
    (no weights are read); the first missing one raises :class:`LaVITMissingFileError`."""
    root = Path(root)
    pd = root / PIXEL_DECODING_DIR
    for name, role in (("unet", "SDXL UNet"), ("vae", "VAE")):
        if not (pd / name / "config.json").is_file():
            raise LaVITMissingFileError(root, pd / name / "config.json", f"{role} config")
        require_weights(pd / name, root, DIFFUSERS_WEIGHT_FILES, role)
    if not (pd / "scheduler" / "scheduler_config.json").is_file():
        raise LaVITMissingFileError(root, pd / "scheduler" / "scheduler_config.json", "DDIM scheduler config")




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
        unet_cfg = read_json(self.folders["unet"] / "config.json", self.root, "SDXL UNet config")
        self.vae_config = read_json(self.folders["vae"] / "config.json", self.root, "VAE config")
        sched_path = self.folders["scheduler"] / "scheduler_config.json"
        self.scheduler_config = read_json(sched_path, self.root, "DDIM scheduler config")
        require_weights(self.folders["unet"], self.root, DIFFUSERS_WEIGHT_FILES, "SDXL UNet")
        require_weights(self.folders["vae"], self.root, DIFFUSERS_WEIGHT_FILES, "VAE")
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
            check_loading_info(info, folder, cls.__name__)
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


__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_STEPS",
    "DIFFUSERS_WEIGHT_FILES",
    "PIXEL_DECODING_DIR",
    "SDXLPixelDecoder",
    "check_pixel_decoder_files",
]
