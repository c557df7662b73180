"""LaVIT's dynamic visual tokenizer: EVA features -> kept patches -> merged tokens -> codebook codes.

Roles (upstream ``DynamicVisualTokenizer``):

* ``encoder``: EVA-CLIP ViT-g/14 (:mod:`pigeon_utils.lavit.eva`), frozen; patch features before the
  final norm, CLS dropped.
* ``token_predictor``: per-patch keep/drop log-probabilities; upstream samples a hard Gumbel decision.
* ``causal_encoder``: the *token merger*, which folds the dropped patches' information into the kept
  ones (causal self-attention among kept tokens, cross-attention to dropped tokens).
* ``encode_task_layer`` + ``quantize``: 32-d task features, nearest codebook row -> code id.
  Visual LLM id = code + 32002.
* ``vit_proj``: the understanding path (continuous merged features projected to the LLM width).

Parameter names are upstream's, so ``tokenizer_encoder.bin`` / the golden
``dynamic_tokenizer.weights`` load with the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pigeon_utils.lavit.config import TokenIds, TokenizerConfig
from pigeon_utils.lavit.eva import EVAVisionTransformer
from pigeon_utils.lavit.ids import codes_to_llm_ids
from pigeon_utils.lavit.layers import FP32LayerNorm, Mlp, merge_heads, split_heads


class TokenPredictor(nn.Module):
    """Scores each patch for keep (channel 0) or drop (channel 1) as log-probabilities.

    ``in_conv`` = LayerNorm (eps 1e-5), Linear, GELU. The first half of the channels stays per token;
    the second half is replaced by its policy-weighted mean over tokens (a global context).
    ``out_conv`` = Linear C->C/2, GELU, Linear C/2->C/4, GELU, Linear C/4->2, LogSoftmax.
    """

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(FP32LayerNorm(width, eps=eps), nn.Linear(width, width), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(width, width // 2), nn.GELU(),
            nn.Linear(width // 2, width // 4), nn.GELU(),
            nn.Linear(width // 4, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` [B, N, C] patch features, ``policy`` [B, N, 1] token weights (default all ones)."""
        x = self.in_conv(x)
        b, n, c = x.shape
        if policy is None:
            policy = x.new_ones(b, n, 1)
        local_x = x[..., : c // 2]
        global_x = (x[..., c // 2:] * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True)
        return self.out_conv(torch.cat((local_x, global_x.expand(b, n, c - c // 2)), dim=-1))


def policy_softmax(logits: torch.Tensor, allowed: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The token merger's masked softmax (upstream ``softmax_with_policy``).

    ``a = exp(logits - max over ALL keys) * allowed`` (computed in float32), then
    ``(a + eps/N) / (sum(a) + eps)``. The maximum includes disallowed keys, so a query with no allowed
    key gets the uniform distribution 1/N (not NaN), and a query whose allowed keys lie far below the
    global maximum drifts towards uniform. ``allowed`` is a 0/1 (float) tensor broadcastable to
    ``logits`` ([B, H, Nq, Nk]).
    """
    n = logits.shape[-1]
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    a = shifted.float().exp() * allowed.float()
    return ((a + eps / n) / (a.sum(dim=-1, keepdim=True) + eps)).to(logits.dtype)


class TokenCausalAttention(nn.Module):
    """Self-attention among tokens: query i sees key j iff j <= i and (j is kept or j == i)."""

    def __init__(self, width: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (width // num_heads) ** -0.5
        self.eps = eps
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def allowed(self, policy: torch.Tensor) -> torch.Tensor:
        """[B, N] keep policy -> [B, 1, N, N] 0/1 attention permission."""
        b, n = policy.shape
        eye = torch.eye(n, dtype=policy.dtype, device=policy.device)
        keep_or_self = policy[:, None, :] + (1.0 - policy[:, None, :]) * eye  # [B, Nq, Nk]
        causal = torch.ones(n, n, dtype=torch.bool, device=policy.device).tril()
        return (keep_or_self * causal.to(policy.dtype))[:, None]

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        attn = policy_softmax((q @ k.transpose(-2, -1)) * self.scale, self.allowed(policy), self.eps)
        return self.proj(merge_heads(attn @ v))


class TokenCrossAttention(nn.Module):
    """Cross-attention from the token stream to the normalised raw features of **dropped** tokens."""

    def __init__(self, width: int, num_heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (width // num_heads) ** -0.5
        self.eps = eps
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, x_origin: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        h = self.num_heads
        q = split_heads(self.query(x), h)
        k = split_heads(self.key(x_origin), h)
        v = split_heads(self.value(x_origin), h)
        allowed = (1.0 - policy)[:, None, None, :]
        attn = policy_softmax((q @ k.transpose(-2, -1)) * self.scale, allowed, self.eps)
        return self.proj(merge_heads(attn @ v))


class CausalFuserBlock(nn.Module):
    """One token-merger block: pre-norm causal attention, cross-attention to dropped tokens, MLP."""

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        w, eps = cfg.width, cfg.layer_norm_eps
        self.norm0 = FP32LayerNorm(w, eps=eps)
        self.token_causal_attn = TokenCausalAttention(w, cfg.merger_heads, cfg.masked_softmax_eps)
        self.norm1 = FP32LayerNorm(w, eps=eps)
        self.token_cross_attn = TokenCrossAttention(w, cfg.merger_heads, cfg.masked_softmax_eps)
        self.norm2 = FP32LayerNorm(w, eps=eps)
        self.mlp = Mlp(w, cfg.merger_mlp_hidden)

    def forward(self, x: torch.Tensor, x_origin: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = x + self.token_causal_attn(self.norm0(x), policy)
        x = x + self.token_cross_attn(self.norm1(x), x_origin, policy)
        return x + self.mlp(self.norm2(x))


class TokenMerger(nn.Module):
    """LaVIT's token merger (``causal_encoder``): updates every position, LaVIT keeps the kept ones.

    The residual stream starts from the raw EVA features; cross-attention keys/values come from
    ``ln_vision(raw features)``. The output passes the final ``norm``.
    """

    def __init__(self, cfg: TokenizerConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CausalFuserBlock(cfg) for _ in range(cfg.merger_depth))
        self.ln_vision = FP32LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.norm = FP32LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``x`` [B, N, C] raw patch features, ``keep`` [B, N] (1 keep, 0 drop) -> [B, N, C]."""
        if keep.shape != x.shape[:2]:
            raise ValueError(f"TokenMerger: keep decision shape {tuple(keep.shape)} does not match "
                             f"features {tuple(x.shape)}")
        policy = keep.to(x.dtype)
        x_origin = self.ln_vision(x)
        for blk in self.blocks:
            x = blk(x, x_origin, policy)
        return self.norm(x)


class CodebookEmbedding(nn.Module):
    """The codebook (``quantize.embedding.weight`` [n_code, code_dim]); random unit rows at init."""

    def __init__(self, n_code: int, code_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(F.normalize(torch.randn(n_code, code_dim), dim=-1))

    def forward(self, code_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(code_ids, self.weight)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-row quantizer of LaVIT (``quantize``).

    The query vectors are L2-normalised; the **stored** codebook rows are used as they are (upstream
    does not renormalise them at lookup). Code = argmin of the squared Euclidean distance.
    """

    def __init__(self, n_code: int, code_dim: int) -> None:
        super().__init__()
        self.n_code = n_code
        self.code_dim = code_dim
        self.embedding = CodebookEmbedding(n_code, code_dim)

    def tokenize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` [..., code_dim] -> (codebook rows [M, code_dim], code ids [M]), M = z.numel() / code_dim."""
        z = F.normalize(z, p=2, dim=-1).reshape(-1, self.code_dim)
        e = self.embedding.weight
        dist = z.pow(2).sum(dim=1, keepdim=True) + e.pow(2).sum(dim=1) - 2.0 * (z @ e.t())
        ids = dist.argmin(dim=1)
        return self.embedding(ids), ids

    def forward(self, code_ids: torch.Tensor) -> torch.Tensor:
        """Code ids -> raw codebook rows (the detokenizer's input)."""
        return self.embedding(code_ids)


@dataclass
class TokenizerOutput:
    """Result of :meth:`DynamicVisualTokenizer.tokenize` for a batch of B images.

    * ``code_ids``: one LongTensor per image, codes of the kept patches in raster order.
    * ``patch_indices``: one LongTensor per image, the patch index (0..N-1) of each kept token.
    * ``token_nums``: [B] number of kept tokens per image.
    * ``keep``: [B, N] float 0/1 keep decision that was used.
    * ``quantized``: [sum(token_nums), code_dim] codebook rows of all kept tokens, images concatenated.
    """

    code_ids: list[torch.Tensor]
    patch_indices: list[torch.Tensor]
    token_nums: torch.Tensor
    keep: torch.Tensor
    quantized: torch.Tensor

    def llm_ids(self, ids: TokenIds = TokenIds(), add_special: bool = False) -> list[torch.Tensor]:
        """Per-image LLM ids (code + 32002), optionally wrapped as 32000 ... 32001."""
        return codes_to_llm_ids(self.code_ids, ids, add_special)


def sample_keep_decision(pred_score: torch.Tensor, generator: torch.Generator | None = None,
                         tau: float = 1.0) -> torch.Tensor:
    """Hard Gumbel-softmax sample of the keep channel (0) of ``pred_score`` [B, N, 2] -> [B, N] 0/1.

    Same distribution as upstream ``F.gumbel_softmax(pred_score, hard=True)[..., 0]``; the noise
    ``-log(e)``, ``e ~ Exponential(1)``, comes from ``generator`` (reproducible), not the global RNG.
    """
    e = torch.empty_like(pred_score, dtype=torch.float32).exponential_(generator=generator)
    y = (pred_score.float() - e.log()) / tau
    return (y.argmax(dim=-1) == 0).to(pred_score.dtype)


class DynamicVisualTokenizer(nn.Module):
    """LaVIT's visual tokenizer (``visual_tokenizer``), full state dict of 99 tensors at tiny size."""

    def __init__(self, cfg: TokenizerConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or TokenizerConfig()
        self.cfg = cfg
        self.encoder = EVAVisionTransformer(cfg.encoder)
        self.encoder.requires_grad_(False)  # frozen upstream
        self.token_predictor = TokenPredictor(cfg.width, cfg.layer_norm_eps)
        self.causal_encoder = TokenMerger(cfg)
        self.quantize = VectorQuantizer(cfg.n_code, cfg.code_dim)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(cfg.width, cfg.width), nn.Tanh(), nn.Linear(cfg.width, cfg.code_dim))
        self.vit_proj = nn.Linear(cfg.width, cfg.llm_dim)

    # -- stages -------------------------------------------------------------------------------
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixel values [B, 3, H, W] -> EVA patch features [B, N, C] (pre-norm, no CLS)."""
        return self.encoder.patch_features(pixel_values)

    def predict_keep_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Token predictor log-probabilities [B, N, 2] (0 keep, 1 drop) with an all-ones policy."""
        features = features.float()
        return self.token_predictor(features, features.new_ones(*features.shape[:2], 1))

    def decide_keep(self, features: torch.Tensor, keep: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """A checked [B, N] float 0/1 keep decision: ``keep`` if given, else a Gumbel sample."""
        b, n = features.shape[:2]
        if keep is None:
            return sample_keep_decision(self.predict_keep_scores(features), generator).to(features.dtype)
        if keep.shape != (b, n):
            raise ValueError(f"keep decision must have shape [B, N] = [{b}, {n}], got {tuple(keep.shape)}")
        keep_f = keep.to(features.dtype)
        if not bool(((keep_f == 0) | (keep_f == 1)).all()):
            bad = keep_f[(keep_f != 0) & (keep_f != 1)].flatten()[:5].tolist()
            raise ValueError(f"keep decision must hold only 0/1 (or bool), found values such as {bad}")
        return keep_f

    def task_features(self, kept_features: torch.Tensor) -> torch.Tensor:
        """``encode_task_layer``: merged kept tokens [M, C] -> [M, code_dim], before L2 normalisation."""
        return self.encode_task_layer(kept_features.to(self.encode_task_layer[-1].weight.dtype))

    # -- entry points -------------------------------------------------------------------------
    def tokenize_features(self, features: torch.Tensor, keep: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> TokenizerOutput:
        """:meth:`tokenize` starting from EVA patch features [B, N, C]."""
        keep_f = self.decide_keep(features, keep, generator)
        merged = self.causal_encoder(features, keep_f)
        mask = keep_f.bool()
        token_nums = mask.sum(dim=1)
        quantized, codes = self.quantize.tokenize(self.task_features(merged[mask]))
        sizes = token_nums.tolist()
        patch_idx = mask.nonzero()[:, 1]  # row-major: images in order, patches in raster order
        return TokenizerOutput(code_ids=list(codes.split(sizes)), patch_indices=list(patch_idx.split(sizes)),
                               token_nums=token_nums, keep=keep_f, quantized=quantized)

    def tokenize(self, pixel_values: torch.Tensor, keep: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> TokenizerOutput:
        """Images [B, 3, H, W] -> per-image codebook codes and the patch index of each kept token.

        ``keep`` [B, N] fixes the keep decision (1 keep, 0 drop); without it the decision is sampled
        (hard Gumbel-softmax on the token predictor's scores) with ``generator``.
        LLM ids: ``output.llm_ids(add_special=...)``.
        """
        return self.tokenize_features(self.encode(pixel_values), keep, generator)

    def encode_features(self, pixel_values: torch.Tensor, keep: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Understanding path: per-image ``vit_proj`` of the merged kept tokens, each [n_i, llm_dim]."""
        features = self.encode(pixel_values)
        keep_f = self.decide_keep(features, keep, generator)
        merged = self.causal_encoder(features, keep_f)
        mask = keep_f.bool()
        return list(self.vit_proj(merged[mask]).split(mask.sum(dim=1).tolist()))
