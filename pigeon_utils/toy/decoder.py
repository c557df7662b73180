"""The toy pixel decoder: a ``diffusers`` ``UNet2DConditionModel`` + ``DDIMScheduler`` in the latent space of a
tiny patch autoencoder (the toy's stand-in for LaVIT's SDXL UNet + ``AutoencoderKL``).

* :class:`PatchAutoencoder` ("VAE"): each 8×8 patch <-> a ``latent_channels`` vector, so a 64×64 image is an 8×8
  latent grid (deterministic, no KL; latents are scaled by ``scaling_factor`` to unit variance, as SD's VAE).
  Diffusing an 8×8 latent instead of 64×64 pixels keeps the UNet small enough to train on a CPU.
* The UNet denoises that grid conditioned on the detokenizer's output: cross-attention to the 64 slots
  (``encoder_hidden_states``), the pooled vector as a class embedding (SDXL's pooled path), and — because the toy's
  slots are one per latent cell — the slots also concatenated to the UNet input as a spatial map.
* Sampling: DDIM, ``prediction_type="sample"``, optional classifier-free guidance against all-zero conditioning
  (LaVIT's negative conditioning); deterministic given a ``torch.Generator``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pigeon_utils.backbone import CheckpointError, PixelDecoder
from pigeon_utils.toy.io import REBUILD, load_state, read_json, require_file, write_json, write_safetensors


@dataclass
class PatchAutoencoderConfig:
    patch_size: int = 8
    latent_channels: int = 8
    hidden: int = 128
    scaling_factor: float = 1.0


class PatchAutoencoder(nn.Module):
    """Patch-wise autoencoder: [B, 3, H, W] in [0, 1] <-> latents [B, C, H/p, W/p]."""

    def __init__(self, config: PatchAutoencoderConfig):
        super().__init__()
        c = self.config = config
        self.encoder = nn.Sequential(nn.Conv2d(3, c.hidden, c.patch_size, stride=c.patch_size), nn.GELU(),
                                     nn.Conv2d(c.hidden, c.latent_channels, 1))
        self.decoder = nn.Sequential(nn.Conv2d(c.latent_channels, c.hidden, 1), nn.GELU(),
                                     nn.Conv2d(c.hidden, c.hidden, 1), nn.GELU(),
                                     nn.ConvTranspose2d(c.hidden, 3, c.patch_size, stride=c.patch_size))

    def encode(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [0, 1] -> scaled latents."""
        return self.encoder(x * 2 - 1) * self.config.scaling_factor

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents -> images in [0, 1]."""
        return torch.sigmoid(self.decoder(z / self.config.scaling_factor))

    def save_pretrained(self, folder: Path) -> None:
        write_json({"class": "PatchAutoencoder", **asdict(self.config)}, Path(folder) / "config.json")
        write_safetensors(self.state_dict(), Path(folder) / "model.safetensors")

    @classmethod
    def from_pretrained(cls, folder: Path) -> "PatchAutoencoder":
        raw = read_json(Path(folder) / "config.json")
        m = cls(PatchAutoencoderConfig(**{k: v for k, v in raw.items()
                                          if k in PatchAutoencoderConfig.__dataclass_fields__}))
        load_state(m, Path(folder) / "model.safetensors")
        return m.eval()


def make_unet(latent_channels: int, cond_dim: int, pooled_dim: int, grid: int = 8, channels=(64, 128)):
    """The toy UNet: 2 resolutions (8×8, 4×4), cross-attention at both, pooled vector as class embedding."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=grid, in_channels=latent_channels + cond_dim, out_channels=latent_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=tuple(channels),
        layers_per_block=1, cross_attention_dim=cond_dim, attention_head_dim=4, norm_num_groups=16,
        class_embed_type="projection", projection_class_embeddings_input_dim=pooled_dim)


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                         clip_sample=False, set_alpha_to_one=True)


class ToyPixelDecoder(PixelDecoder):
    """UNet + DDIM + patch autoencoder; see the module docstring."""

    def __init__(self, unet, scheduler, vae: PatchAutoencoder, num_inference_steps: int = 20,
                 guidance_scale: float = 1.0):
        self.unet, self.scheduler, self.vae = unet, scheduler, vae
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale

    def unet_input(self, latents: Tensor, cond: Tensor) -> Tensor:
        """Latents [B, C, g, g] with the slots [B, g*g, D] appended as a spatial map."""
        b, _, g, _ = latents.shape
        return torch.cat([latents, cond.transpose(1, 2).reshape(b, -1, g, g)], 1)

    def predict(self, latents: Tensor, t, cond: Tensor, pooled: Tensor) -> Tensor:
        return self.unet(self.unet_input(latents, cond), t, encoder_hidden_states=cond, class_labels=pooled).sample

    def draw_noise(self, n: int, generator: torch.Generator | None = None, **size) -> Tensor:
        g = self.unet.config.sample_size
        return torch.randn(n, self.unet.config.out_channels, g, g, generator=generator,
                           dtype=next(self.unet.parameters()).dtype)

    @torch.no_grad()
    def decode(self, cond: Tensor, pooled: Tensor, generator: torch.Generator | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               noise: Tensor | None = None) -> Tensor:
        from diffusers import DDIMScheduler

        steps = num_inference_steps or self.num_inference_steps
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        p = next(self.unet.parameters())
        cond, pooled = cond.to(p), pooled.to(p)
        noise = self.draw_noise(len(cond), generator) if noise is None else noise
        if noise.shape[0] != len(cond):
            raise ValueError(f"noise holds {noise.shape[0]} images' latents for {len(cond)} conditionings")
        lat = noise.to(p.device, p.dtype) * sched.init_noise_sigma
        for t in sched.timesteps:
            if scale != 1.0:
                both = self.predict(torch.cat([lat, lat]), t, torch.cat([torch.zeros_like(cond), cond]),
                                    torch.cat([torch.zeros_like(pooled), pooled]))
                uncond, c = both.chunk(2)
                pred = uncond + scale * (c - uncond)
            else:
                pred = self.predict(lat, t, cond, pooled)
            lat = sched.step(pred, t, lat, eta=0.0).prev_sample
        return self.vae.decode(lat).clamp(0, 1)

    def save_pretrained(self, folder: Path) -> None:
        folder = Path(folder)
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        self.scheduler.save_pretrained(folder / "scheduler")
        self.vae.save_pretrained(folder / "vae")
        write_json({"class": "ToyPixelDecoder", "num_inference_steps": self.num_inference_steps,
                    "guidance_scale": self.guidance_scale}, folder / "config.json")

    @classmethod
    def from_pretrained(cls, folder: Path) -> "ToyPixelDecoder":
        from diffusers import DDIMScheduler, UNet2DConditionModel

        folder = Path(folder)
        cfg = read_json(folder / "config.json")
        for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
            require_file(folder / f)
        try:
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
        except Exception as e:  # diffusers raises several types for a broken file
            raise CheckpointError(f"{folder / 'unet'}: damaged checkpoint ({type(e).__name__}: {e}); {REBUILD}") \
                from None
        scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
        vae = PatchAutoencoder.from_pretrained(folder / "vae")
        return cls(unet.eval(), scheduler, vae, cfg["num_inference_steps"], cfg["guidance_scale"])


def one_cycle(opt: torch.optim.Optimizer, lr: float, steps: int, pct_start: float):
    """``OneCycleLR`` over `steps` steps with a warm-up of `pct_start`, except when that warm-up would end exactly at
    step 0 (``pct_start · steps == 1``, e.g. 20 steps at 0.05): torch then divides by a zero-length phase, so the
    warm-up takes two steps instead. Every other step count gets torch's schedule unchanged."""
    total = max(int(steps), 1)
    if float(pct_start * total) == 1.0:
        pct_start = 2.0 / total
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=pct_start)


def train_autoencoder(vae: PatchAutoencoder, images: Tensor, steps: int, batch: int, lr: float,
                      gen: torch.Generator, noise: float = 0.05, progress: bool = True) -> float:
    """Fit the patch autoencoder on images [N, 3, H, W] in [0, 1] (pixel-wise BCE; latents jittered with `noise` so that
    the decoder tolerates the diffusion model's small errors), then set ``scaling_factor`` to 1 / latent std.
    Returns the final reconstruction MSE on the training images."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = one_cycle(opt, lr, steps, 0.1)
    vae.train()
    for _ in tqdm(range(steps), desc="toy VAE", disable=not progress, mininterval=2):
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        z = vae.encoder(x * 2 - 1)
        z = z + noise * z.detach().std() * torch.randn(z.shape, generator=gen)
        loss = F.binary_cross_entropy_with_logits(vae.decoder(z), x)  # sharper edges than MSE
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval()
    with torch.no_grad():
        sample = images[:1024]
        std = vae.encoder(sample * 2 - 1).std().item()
        vae.config.scaling_factor = 1.0 / std
        return F.mse_loss(vae.decode(vae.encode(sample)), sample).item()


def train_pixel_decoder(detokenizer, decoder: ToyPixelDecoder, codes: Tensor, mask: Tensor, latents: Tensor,
                        steps: int, batch: int, lr: float, gen: torch.Generator, p_uncond: float = 0.1,
                        progress: bool = True, features: Tensor | None = None, feature_weight: float = 0.0) -> float:
    """Train the detokenizer and the UNet together on the diffusion loss (x0-prediction MSE).

    ``codes``/``mask`` [N, T]: each training image's padded code ids; ``latents`` [N, C, g, g]: its scaled VAE
    latents. With probability `p_uncond` a sample's conditioning is zeroed (for classifier-free guidance).

    ``features`` [N, F] (e.g. the toy CLIP's image embeddings) with ``feature_weight`` > 0 adds a feature
    reconstruction term: a linear read-out of the mean conditioning row must match each image's feature vector
    (weight × (1 − cosine)). The mean row is what Pigeon's adapter turns into the reference embedding; LaVIT's
    decoder output carries the image's meaning there, and on the diffusion loss alone the toy's carries only its
    style. The read-out is training-only (not saved). Returns the final diffusion loss (moving average).
    """
    from tqdm.auto import tqdm

    unet, sched = decoder.unet, decoder.scheduler
    params = list(detokenizer.parameters()) + list(unet.parameters())
    readout = None
    if feature_weight > 0:
        if features is None or len(features) != len(codes):
            raise ValueError(f"train_pixel_decoder: feature_weight={feature_weight} needs `features` with one row "
                             f"per training image ({len(codes)}), got "
                             f"{None if features is None else len(features)}")
        readout = torch.nn.Linear(detokenizer.cond_dim, features.shape[1])
        params += list(readout.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    lr_sched = one_cycle(opt, lr, steps, 0.05)
    detokenizer.train()
    unet.train()
    ema = float("nan")
    bar = tqdm(range(steps), desc="toy detokenizer + UNet", disable=not progress, mininterval=2)
    for step in bar:
        idx = torch.randint(len(codes), (batch,), generator=gen)
        x0 = latents[idx]
        cond, pooled = detokenizer(codes[idx], mask[idx])
        aux = 0.0
        if readout is not None:
            aux = feature_weight * (1 - F.cosine_similarity(readout(cond.mean(1)), features[idx], dim=-1)).mean()
        keep = (torch.rand(batch, generator=gen) >= p_uncond).float()
        cond, pooled = cond * keep[:, None, None], pooled * keep[:, None]
        t = torch.randint(sched.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = F.mse_loss(decoder.predict(sched.add_noise(x0, noise, t), t, cond, pooled), x0)
        opt.zero_grad(set_to_none=True)
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema = loss.item() if ema != ema else 0.95 * ema + 0.05 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
    detokenizer.eval()
    unet.eval()
    return ema
