"""The toy CLIP: a small ``open_clip`` model trained contrastively on toy images and their captions.

It stands in for ViT-H-14 in the toy world (CLIP text / image scores, FID features) and, because the toy images
have known factors, gives zero-shot semantic and style accuracy: an image's factors are read from the best-scoring
of the 512 full captions, and a factor is right when that caption has the image's value.

The model is an actual ``open_clip.CLIP`` built by ``open_clip.create_model("local-dir:<folder>")`` from
``<folder>/open_clip_config.json`` (a custom small config: ViT with 8-px patches on 64×64 images, a 2-layer text
transformer over the toy word vocabulary); weights are read from ``<folder>/model.safetensors``. Text is tokenized
with the toy text tokenizer plus one end-of-text id, the highest of the vocabulary (open_clip's argmax pooling).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pigeon_utils.backbone import CheckpointError
from pigeon_utils.toy.io import REBUILD, load_state, read_json, require_file, write_json, write_safetensors

CONTEXT = 16
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def clip_model_cfg(text_vocab: int, embed_dim: int = 64, width: int = 16) -> dict:
    """open_clip model config: a ModifiedResNet image tower (4 stages of one bottleneck block, attention pool)
    and a 2-layer text transformer."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": width, "head_width": 64},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": text_vocab + 1, "width": 64, "heads": 2, "layers": 2,
                     "mlp_ratio": 2.0, "pool_type": "argmax"},
    }


@dataclass
class ToyClip:
    """An ``open_clip`` model with the toy text tokenizer; images are uint8 [B, 64, 64, 3] or PIL images."""

    model: torch.nn.Module
    text_tokenizer: object

    @property
    def eot_id(self) -> int:
        return self.model.vocab_size - 1

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Texts -> [N, CONTEXT] ids: words, then the end-of-text id, zero-padded (truncated to fit)."""
        rows = self.text_tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        out = torch.zeros(len(rows), CONTEXT, dtype=torch.long)
        for i, r in enumerate(rows):  # one row per text, not per token
            r = r[: CONTEXT - 1] + [self.eot_id]
            out[i, : len(r)] = torch.tensor(r)
        return out

    @staticmethod
    def preprocess(images) -> Tensor:
        """uint8 [B, H, W, 3] (or PIL list, or float [B, 3, H, W] in [0, 1]) -> normalized float [B, 3, H, W]."""
        if isinstance(images, Tensor) and images.dtype.is_floating_point:
            x = images
        else:
            from pigeon_utils.toy.tokenizer import images_to_array

            arr = images.numpy() if isinstance(images, Tensor) else images_to_array(images)
            x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255
        return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]

    @torch.no_grad()
    def image_features(self, images, batch: int = 256) -> Tensor:
        x = self.preprocess(images)
        return torch.cat([self.model.encode_image(x[i:i + batch], normalize=True) for i in range(0, len(x), batch)])

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> Tensor:
        return self.model.encode_text(self.tokenize(texts), normalize=True)

    @torch.no_grad()
    def predict_factors(self, images) -> list[dict]:
        """Zero-shot factors of each image: those of its best-scoring full caption."""
        from pigeon_utils.toy.text import toy_captions
        from pigeon_utils.toy.data import COLOURS, GLYPHS, PATTERNS, STROKES

        caps = toy_captions()
        best = (self.image_features(images) @ self.text_features(caps).T).argmax(1)
        combos = [(g, c, p, s) for g in GLYPHS for c in COLOURS for p in PATTERNS for s in STROKES]
        return [dict(zip(("glyph", "colour", "pattern", "stroke"), combos[i])) for i in best.tolist()]

    def save_pretrained(self, folder: Path, model_cfg: dict) -> None:
        folder = Path(folder)
        write_clip_config(folder, model_cfg)
        write_safetensors(self.model.state_dict(), folder / "model.safetensors")

    @classmethod
    def from_pretrained(cls, folder: Path, text_tokenizer) -> "ToyClip":
        folder = Path(folder)
        require_file(folder / "model.safetensors")
        model = create_clip(folder)
        load_state(model, folder / "model.safetensors")
        return cls(model.eval(), text_tokenizer)


def write_clip_config(folder: Path, model_cfg: dict) -> None:
    write_json({"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD)}},
               Path(folder) / "open_clip_config.json")


def create_clip(folder: Path):
    """``open_clip.create_model('local-dir:<folder>')`` with freshly initialised weights (loaded separately)."""
    import logging

    import open_clip

    read_json(require_file(Path(folder) / "open_clip_config.json"))  # clear error when missing / damaged
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns that the weights are not loaded: we load them ourselves
    try:
        return open_clip.create_model(f"local-dir:{Path(folder)}", load_weights=False)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / 'open_clip_config.json'}: damaged checkpoint file ({e}); {REBUILD}") \
            from None
    finally:
        root.setLevel(level)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable 5-tap Gaussian blur of [B, C, H, W] (reflect padding)."""
    k = torch.exp(-torch.arange(-2, 3, dtype=x.dtype) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="reflect"), k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def factor_accuracy(pred: list[dict], truth: list[dict]) -> dict[str, float]:
    """Per-factor accuracy and the all-factors-right rate of predicted vs true factor dicts."""
    keys = ("glyph", "colour", "pattern", "stroke")
    ok = np.array([[p[k] == t[k] for k in keys] for p, t in zip(pred, truth)])
    out = {k: float(ok[:, i].mean()) for i, k in enumerate(keys)}
    out["all"] = float(ok.all(1).mean())
    return out


def train_clip(clip: ToyClip, images: Tensor, captions: Sequence[str], steps: int, batch: int, lr: float,
               gen: torch.Generator, progress: bool = True, channels_last: bool = False) -> float:
    """Contrastive training on uint8 images [N, H, W, 3] with one caption each.

    Images with the same caption are all positives of each other (a soft target), since a batch of toy images
    often repeats a caption. Half of each batch is blurred a little (σ in [0.3, 1.2] px), so that the toy CLIP
    judges decoded images, which are softer than renders, by their factors. `channels_last`: channels-last
    convolutions (faster on CPU with oneDNN, and other numerics than the default layout; the build uses them).
    Returns the last loss.
    """
    from tqdm.auto import tqdm

    model = clip.model
    if channels_last:  # back to the default layout at the end: safetensors stores contiguous tensors
        model.to(memory_format=torch.channels_last)
    tokens = clip.tokenize(captions)
    cap_ids = torch.unique(tokens, dim=0, return_inverse=True)[1]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    from pigeon_utils.toy.decoder import one_cycle

    sched = one_cycle(opt, lr, steps, 0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc="toy CLIP", disable=not progress, mininterval=2):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = clip.preprocess(images[idx])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        half = batch // 2  # blur half the batch: the judge must also read decoded (slightly soft) images
        x[:half] = gaussian_blur(x[:half], 0.3 + 0.9 * float(torch.rand((), generator=gen)))
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokens[idx], normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        same = (cap_ids[idx][:, None] == cap_ids[idx][None]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    model.eval()
    return float(loss.detach())
