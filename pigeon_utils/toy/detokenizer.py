"""The toy detokenizer: code ids -> 64 conditioning slots [B, 64, D] + pooled vector [B, D'].

LaVIT's ``HighresVQDecoder`` embeds the codebook rows of the kept tokens and lets 256 learned query slots read them;
its outputs condition the diffusion UNet, and their mean feeds Pigeon's adapter MLP. The toy does the same at
toy size with one slot per patch of the 8×8 grid: each patch token's code embedding (from its code-table row:
shape centroid, position) is written into the slot of its patch, the image token's embedding (background tile,
colour) is added to every slot, empty slots get a learned "background" vector, and a small transformer mixes the
slots. Tokens may come in any order, may be missing (Pigeon masks and drops them) or repeat a position (they are
then averaged); the code tables are buffers, so the module is self-contained.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pigeon_utils.backbone import Detokenizer
from pigeon_utils.toy.io import load_state, read_json, write_json, write_safetensors


@dataclass
class ToyDetokenizerConfig:
    codebook_size: int = 4128
    n_patches: int = 64
    patch_pixels: int = 64  # p*p
    dim: int = 64
    layers: int = 2
    heads: int = 4
    pooled_dim: int = 64


class ToyDetokenizer(Detokenizer):
    def __init__(self, config: ToyDetokenizerConfig):
        super().__init__()
        c = self.config = config
        self.cond_dim, self.pooled_dim = c.dim, c.pooled_dim
        v, pp = c.codebook_size, c.patch_pixels
        self.register_buffer("code_position", torch.full((v,), -1, dtype=torch.long))
        self.register_buffer("code_mask", torch.zeros(v, pp))
        self.register_buffer("code_tile", torch.zeros(v, pp * 3))
        self.register_buffer("code_colour", torch.zeros(v, 3))
        self.in_proj = nn.Linear(pp + pp * 3 + 3, c.dim)
        self.slot_pos = nn.Parameter(torch.randn(c.n_patches, c.dim) * 0.02)
        self.empty = nn.Parameter(torch.zeros(c.dim))  # a slot no patch token wrote to
        self.no_image_token = nn.Parameter(torch.zeros(c.dim))  # the image token was masked away
        layer = nn.TransformerEncoderLayer(c.dim, c.heads, 4 * c.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.pool = nn.Linear(c.dim, c.pooled_dim)

    def set_code_table(self, table: dict[str, Tensor]) -> None:
        """Copy the tokenizer's per-code tables (:meth:`ToyVisualTokenizer.code_table`) into the buffers."""
        for name in ("position", "mask", "tile", "colour"):
            getattr(self, f"code_{name}").copy_(table[name])

    def forward(self, codes: Tensor, mask: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, n = codes.shape[0], self.config.n_patches
        codes = codes.clamp(0, self.config.codebook_size - 1)
        feats = torch.cat([self.code_mask[codes], self.code_tile[codes], self.code_colour[codes]], -1)
        e = self.in_proj(feats) * mask[..., None]  # [B, T, D], padding zeroed
        if weights is not None:
            e = e * weights[..., None].to(e.dtype)
        pos = self.code_position[codes]
        is_patch = mask & (pos >= 0)
        is_image = (mask & (pos < 0)).float()
        # scatter patch tokens into their slots (mean over repeats); image tokens: mean, broadcast to all slots
        slot_idx = torch.where(is_patch, pos, n)  # non-patch tokens go to a dummy slot n
        slots = e.new_zeros(b, n + 1, e.shape[-1]).scatter_add_(1, slot_idx[..., None].expand_as(e),
                                                               e * is_patch[..., None])
        count = e.new_zeros(b, n + 1).scatter_add_(1, slot_idx, is_patch.float())[:, :n, None]
        slots = torch.where(count > 0, slots[:, :n] / count.clamp(min=1), self.empty)
        n_img = is_image.sum(1, keepdim=True)
        image = torch.where(n_img > 0, (e * is_image[..., None]).sum(1) / n_img.clamp(min=1), self.no_image_token)
        x = self.blocks(slots + image[:, None] + self.slot_pos)
        cond = self.norm(x)
        return cond, self.pool(cond.mean(1))

    def save_pretrained(self, folder: Path) -> None:
        write_json({"class": "ToyDetokenizer", **asdict(self.config)}, Path(folder) / "config.json")
        write_safetensors(self.state_dict(), Path(folder) / "model.safetensors")

    @classmethod
    def from_pretrained(cls, folder: Path) -> "ToyDetokenizer":
        raw = read_json(Path(folder) / "config.json")
        cfg = ToyDetokenizerConfig(**{k: v for k, v in raw.items() if k in ToyDetokenizerConfig.__dataclass_fields__})
        m = cls(cfg)
        load_state(m, Path(folder) / "model.safetensors")
        return m.eval()
