"""EVA-CLIP ViT-g/14: the frozen image encoder inside LaVIT's dynamic visual tokenizer.

State-dict names follow upstream (``visual_tokenizer/eva_vitg_psz14.bin``, no prefix; ``encoder.*``
inside ``DynamicVisualTokenizer``): ``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
``blocks.N.{norm1, attn.{q_bias, v_bias, qkv.weight, proj.*}, norm2, mlp.{fc1, fc2}.*}``,
``norm.*``, ``head.*``.

Architecture (LaVIT's code path): pre-norm ViT, CLS token plus learned absolute position embedding,
no rotary embedding, no relative position bias, no layer scale, exact GELU, LayerNorm eps 1e-6.
The attention's fused ``qkv`` Linear has no bias tensor; its bias is ``cat(q_bias, 0, v_bias)``.
LaVIT consumes the output of the last block **before** the final ``norm`` (``norm`` and ``head``
are kept only so that published weights load strictly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pigeon_utils.lavit.config import EVAConfig
from pigeon_utils.lavit.layers import FP32LayerNorm, Mlp, attention, merge_heads, split_heads


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution: [B, 3, H, W] -> [B, N, C] in raster order."""

    def __init__(self, cfg: EVAConfig) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"EVA encoder expects {self.img_size}x{self.img_size} images, got "
                             f"{tuple(x.shape[-2:])} (input shape {tuple(x.shape)})")
        return self.proj(x).flatten(2).transpose(1, 2)


class EVAAttention(nn.Module):
    """Multi-head self-attention with fused bias-free ``qkv`` and separate ``q_bias``/``v_bias``."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.proj = nn.Linear(width, width)

    def qkv_bias(self) -> torch.Tensor:
        """The effective fused bias: (q_bias, zeros, v_bias). The key bias is always zero."""
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.qkv.weight, self.qkv_bias()).chunk(3, dim=-1)
        h = self.num_heads
        out = attention(split_heads(q, h), split_heads(k, h), split_heads(v, h))
        return self.proj(merge_heads(out))


class EVABlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: EVAConfig) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = EVAAttention(cfg.width, cfg.num_heads)
        self.norm2 = FP32LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EVAVisionTransformer(nn.Module):
    """EVA-CLIP ViT-g/14 image encoder (LaVIT's ``encoder``); weights from ``eva_vitg_psz14.bin``."""

    def __init__(self, cfg: EVAConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or EVAConfig()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(EVABlock(cfg) for _ in range(cfg.depth))
        self.norm = FP32LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.width, cfg.head_dim_out)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embedding, CLS prepended, position embedding added: the input of block 0."""
        x = self.patch_embed(pixel_values)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat((cls, x), dim=1) + self.pos_embed.to(x.dtype)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last block's output **before** the final norm, all tokens (CLS first): [B, N+1, C].

        Same as upstream ``encoder(x, return_all_features=True)``.
        """
        x = self.embed(pixel_values)
        for blk in self.blocks:
            x = blk(x)
        return x

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What LaVIT's tokenizer consumes: :meth:`forward_features` without CLS, [B, N, C]."""
        return self.forward_features(pixel_values)[:, 1:]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP image embedding ``head(norm(x)[:, 0])``. Not used by LaVIT."""
        return self.head(self.norm(self.forward_features(pixel_values))[:, 0])
