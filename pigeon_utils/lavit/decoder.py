"""LaVIT's detokenizer: visual codes -> conditioning of the diffusion UNet.

Roles:

* :class:`HighresVQDecoder` (``visual_tokenizer/highres_tokenizer_decoder.bin``, LaVIT-7B-v2's default):
  SDXL-style ``prompt_embeds`` [B, 256, 768 + 1280] and ``pooled_prompt_embeds`` [B, 1280], which take
  the place of SDXL's two text encoders.
* :class:`VQDecoder` (lowres, ``visual_tokenizer/tokenizer_decoder.bin``): ``unet_proj`` output
  [B, 256, 768] for an SD-1.5-like UNet.

Shared trunk: ``in_proj`` maps raw codebook rows to the decoder width; each image's tokens are
right-padded to the batch maximum and get ``pos_embed`` by their order among the kept tokens
(padding rows too); ``num_queries`` learned queries pass pre-norm blocks of unmasked self-attention,
cross-attention to the padded tokens (additive (1 - mask) * -10000 key mask) and an MLP; then
``norm`` and ``decode_task_layer`` (Linear, Tanh, Linear) give ``visual_rec``.
"""
from __future__ import annotations

import torch
from torch import nn

from pigeon_utils.lavit.config import DecoderConfig
from pigeon_utils.lavit.layers import FP32LayerNorm, Mlp, attention, merge_heads, split_heads

#: additive logit for padded keys in the detokenizer's cross-attention (upstream value).
PAD_LOGIT = -10000.0


class SelfAttention(nn.Module):
    """Unmasked multi-head self-attention over the queries (fused ``qkv`` with bias)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(merge_heads(attention(q, k, v)))


class CrossAttention(nn.Module):
    """Queries attend to the padded code embeddings; padded keys get ``PAD_LOGIT`` added."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, codes: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        h = self.num_heads
        out = attention(split_heads(self.query(x), h), split_heads(self.key(codes), h),
                        split_heads(self.value(codes), h), additive_mask)
        return self.proj(merge_heads(out))


class Block(nn.Module):
    """Detokenizer block: pre-norm self-attention, cross-attention to the codes, MLP."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        w, eps = cfg.width, cfg.layer_norm_eps
        self.norm0 = FP32LayerNorm(w, eps=eps)
        self.self_attn = SelfAttention(w, cfg.num_heads)
        self.norm1 = FP32LayerNorm(w, eps=eps)
        self.cross_attn = CrossAttention(w, cfg.num_heads)
        self.norm2 = FP32LayerNorm(w, eps=eps)
        self.mlp = Mlp(w, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, codes: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), codes, additive_mask)
        return x + self.mlp(self.norm2(x))


class AttentionPool2d(nn.Module):
    """CLIP-style attention pool (``unet_attnpool``) giving the SDXL pooled embedding.

    Prepends the mean token, adds ``positional_embedding`` [num_queries + 1, dim], runs multi-head
    attention with separate ``q_proj``/``k_proj``/``v_proj``, projects with ``c_proj`` and returns
    token 0.
    """

    def __init__(self, seq_len: int, dim: int, num_heads: int, output_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.positional_embedding = nn.Parameter(torch.randn(seq_len + 1, dim) / dim ** 0.5)
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)

    def forward(self, x: torch.Tensor, return_all_tokens: bool = False) -> torch.Tensor:
        """``x`` [B, N, dim] -> [B, output_dim] (or [B, N + 1, output_dim] with ``return_all_tokens``)."""
        n = x.shape[1]
        if n + 1 != self.positional_embedding.shape[0]:
            raise ValueError(f"AttentionPool2d: expected {self.positional_embedding.shape[0] - 1} tokens, got {n}")
        x = torch.cat((x.mean(dim=1, keepdim=True), x), dim=1) + self.positional_embedding.to(x.dtype)
        h = self.num_heads
        out = attention(split_heads(self.q_proj(x), h), split_heads(self.k_proj(x), h),
                        split_heads(self.v_proj(x), h))
        out = self.c_proj(merge_heads(out))
        return out if return_all_tokens else out[:, 0]


class _DecoderTrunk(nn.Module):
    """Parameters and forward pass shared by :class:`VQDecoder` and :class:`HighresVQDecoder`."""

    def __init__(self, cfg: DecoderConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or DecoderConfig()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.code_dim, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.width))
        self.query_embed = nn.Parameter(torch.zeros(1, cfg.num_queries, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = FP32LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.decode_task_layer = nn.Sequential(
            nn.Linear(cfg.width, cfg.width), nn.Tanh(), nn.Linear(cfg.width, cfg.out_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.query_embed, std=0.02)

    def pad_codes(self, codebook_rows: torch.Tensor, token_nums: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Concatenated rows [M, code_dim] + counts [B] -> (``in_proj`` + ``pos_embed``, right-padded,
        [B, L, width]; additive key mask [B, 1, 1, L]), L = max(token_nums)."""
        token_nums = torch.as_tensor(token_nums, device=codebook_rows.device).long()
        if token_nums.dim() != 1 or token_nums.numel() == 0:
            raise ValueError(f"token_nums must be a non-empty 1-D tensor, got shape {tuple(token_nums.shape)}")
        total = int(token_nums.sum())
        if codebook_rows.dim() != 2 or codebook_rows.shape[0] != total:
            raise ValueError(f"codebook_rows must be [sum(token_nums) = {total}, {self.cfg.code_dim}], "
                             f"got {tuple(codebook_rows.shape)}")
        max_len = int(token_nums.max())
        if max_len == 0:
            raise ValueError("the detokenizer needs at least one visual token in the batch (all token_nums are 0)")
        if max_len > self.cfg.num_queries:
            raise ValueError(f"an image has {max_len} visual tokens; the detokenizer's pos_embed holds "
                             f"{self.cfg.num_queries}")
        x = self.in_proj(codebook_rows)
        valid = torch.arange(max_len, device=x.device)[None, :] < token_nums[:, None]  # [B, L]
        padded = x.new_zeros(token_nums.numel(), max_len, x.shape[-1])
        padded[valid] = x
        padded = padded + self.pos_embed[:, :max_len].to(x.dtype)
        additive = (1.0 - valid.to(x.dtype)) * PAD_LOGIT
        return padded, additive[:, None, None, :]

    def decode_queries(self, codebook_rows: torch.Tensor, token_nums: torch.Tensor) -> torch.Tensor:
        """Trunk output ``visual_rec`` = decode_task_layer(norm(queries)) [B, num_queries, out_dim]."""
        codes, additive = self.pad_codes(codebook_rows, token_nums)
        x = self.query_embed.expand(codes.shape[0], -1, -1).to(codes.dtype)
        for blk in self.blocks:
            x = blk(x, codes, additive)
        return self.decode_task_layer(self.norm(x))


class VQDecoder(_DecoderTrunk):
    """Lowres detokenizer: ``unet_proj(visual_rec)`` [B, num_queries, 768] for an SD-1.5-like UNet."""

    def __init__(self, cfg: DecoderConfig | None = None) -> None:
        super().__init__(cfg)
        self.unet_proj = nn.Linear(self.cfg.out_dim, self.cfg.lowres_unet_proj_dim)

    def forward(self, codebook_rows: torch.Tensor, token_nums: torch.Tensor) -> torch.Tensor:
        """Raw codebook rows of all images concatenated [M, code_dim] and counts [B]."""
        return self.unet_proj(self.decode_queries(codebook_rows, token_nums))


class HighresVQDecoder(_DecoderTrunk):
    """Highres detokenizer (LaVIT-7B-v2 default) for an SDXL-architecture UNet."""

    def __init__(self, cfg: DecoderConfig | None = None) -> None:
        super().__init__(cfg)
        c = self.cfg
        self.unet_proj_1 = nn.Linear(c.out_dim, c.unet_proj_1_dim)
        self.unet_proj_2 = nn.Linear(c.out_dim, c.unet_proj_2_dim)
        self.unet_attnpool = AttentionPool2d(c.num_queries, c.out_dim, c.num_heads, c.pooled_dim)

    def forward(self, codebook_rows: torch.Tensor, token_nums: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw codebook rows [M, code_dim] and counts [B] -> (prompt_embeds [B, Q, 768 + 1280],
        pooled_prompt_embeds [B, 1280])."""
        visual_rec = self.decode_queries(codebook_rows, token_nums)
        prompt_embeds = torch.cat((self.unet_proj_1(visual_rec), self.unet_proj_2(visual_rec)), dim=-1)
        return prompt_embeds, self.unet_attnpool(visual_rec)
