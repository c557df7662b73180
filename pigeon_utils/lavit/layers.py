"""Small building blocks shared by LaVIT's encoder, token merger and detokenizer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype.

    Upstream LaVIT uses this for every LayerNorm (apex ``FusedLayerNorm`` when installed, which is
    the same computation), so that the bf16/fp16 path normalises in full precision.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class Mlp(nn.Module):
    """Two-layer MLP with exact (erf) GELU: ``fc2(gelu(fc1(x)))``. Parameter names ``fc1``/``fc2``."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, C] -> [B, H, N, C/H]."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] -> [B, N, H*D]."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              additive_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Plain softmax attention with the 1/sqrt(head_dim) scale; inputs [B, H, N, D].

    ``additive_mask`` (broadcastable to [B, H, Nq, Nk]) is added to the logits before the softmax.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=additive_mask, dropout_p=0.0)
