"""Size configuration of LaVIT's custom modules (visual tokenizer and detokenizer).

LaVIT (checkpoint ``rain1011/LaVIT-7B-v2``) hard-codes most of its widths. Here every width is a plain
dataclass field so that the same classes can be built at the real size (:meth:`LaVITConfig.real`), at
the size of the golden tiny fixtures (:meth:`LaVITConfig.tiny`) and at the sizes that a golden fixture set's
``config.json`` records (:meth:`LaVITConfig.from_golden`). This includes the widths that upstream fixes
inside the constructors: ``vit_proj`` (4096) and the detokenizer heads (1408 / 768 / 1280).

MLP hidden widths are stored as integers.  Upstream derives them as ``int(width * 4.3637)``
(6144 for width 1408, 279 for width 64); :func:`eva_mlp_hidden` reproduces that rule.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

#: MLP ratio of EVA-CLIP ViT-g/14, also used by LaVIT's token merger and detokenizer.
EVA_MLP_RATIO = 4.3637

#: CLIP image normalisation used by ``LaVITImageProcessor``.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def eva_mlp_hidden(width: int, ratio: float = EVA_MLP_RATIO) -> int:
    """Hidden width of an MLP as upstream computes it: ``int(width * ratio)``."""
    return int(width * ratio)


def _check_heads(where: str, width: int, heads: int) -> None:
    if heads <= 0 or width % heads:
        raise ValueError(f"{where}: width {width} is not divisible by num_heads {heads}")


@dataclass(frozen=True)
class EVAConfig:
    """EVA-CLIP ViT-g/14, the frozen image encoder of LaVIT's visual tokenizer (``encoder.*``)."""

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    width: int = 1408
    depth: int = 40
    num_heads: int = 16
    mlp_hidden: int = 6144
    #: output width of ``head`` (the CLIP embedding width); LaVIT never applies the head.
    head_dim_out: int = 1024
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_heads("EVAConfig", self.width, self.num_heads)
        if self.img_size % self.patch_size:
            raise ValueError(f"EVAConfig: img_size {self.img_size} is not a multiple of patch_size "
                             f"{self.patch_size}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class TokenizerConfig:
    """``DynamicVisualTokenizer``: EVA encoder + token predictor + token merger + quantizer.

    ``width`` of the predictor / merger / task layer is the EVA width (``encoder.width``).
    """

    encoder: EVAConfig = field(default_factory=EVAConfig)
    merger_depth: int = 12
    merger_heads: int = 16
    merger_mlp_hidden: int = 6144
    n_code: int = 16384
    code_dim: int = 32
    #: output width of ``vit_proj`` (the LLM hidden size; hard-coded 4096 upstream).
    llm_dim: int = 4096
    layer_norm_eps: float = 1e-5
    #: eps of the merger's masked softmax ``(a + eps/N) / (sum(a) + eps)``.
    masked_softmax_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_heads("TokenizerConfig (token merger)", self.encoder.width, self.merger_heads)
        if self.encoder.width % 4:
            raise ValueError(f"TokenizerConfig: the token predictor halves and quarters the width; "
                             f"{self.encoder.width} is not divisible by 4")

    @property
    def width(self) -> int:
        return self.encoder.width


@dataclass(frozen=True)
class DecoderConfig:
    """LaVIT's detokenizer (``HighresVQDecoder`` / lowres ``VQDecoder``): codes -> UNet conditioning."""

    #: number of learned queries = length of ``pos_embed`` = most tokens per image (256 = 16x16 patches).
    num_queries: int = 256
    code_dim: int = 32
    width: int = 1408
    depth: int = 12
    num_heads: int = 16
    mlp_hidden: int = 6144
    #: width of ``decode_task_layer``'s output (hard-coded 1408 upstream).
    out_dim: int = 1408
    #: highres heads (hard-coded upstream): CLIP-L-like 768 and OpenCLIP-bigG-like 1280, pooled 1280.
    unet_proj_1_dim: int = 768
    unet_proj_2_dim: int = 1280
    pooled_dim: int = 1280
    #: lowres ``unet_proj`` output (hard-coded 768 upstream).
    lowres_unet_proj_dim: int = 768
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check_heads("DecoderConfig", self.width, self.num_heads)
        _check_heads("DecoderConfig (attention pool over decode_task_layer output)", self.out_dim,
                     self.num_heads)

    @property
    def prompt_dim(self) -> int:
        """Width of the highres ``prompt_embeds`` (768 + 1280 = 2048 in the real model)."""
        return self.unet_proj_1_dim + self.unet_proj_2_dim


@dataclass(frozen=True)
class TokenIds:
    """LLM vocabulary layout of LaVIT: visual id = code + ``visual_offset``."""

    image_start: int = 32000
    image_end: int = 32001
    visual_offset: int = 32002
    pad: int = 2


@dataclass(frozen=True)
class LaVITConfig:
    """All sizes of LaVIT's custom modules plus the image preprocessing and id layout."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    ids: TokenIds = field(default_factory=TokenIds)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    @property
    def image_size(self) -> int:
        return self.tokenizer.encoder.img_size

    @classmethod
    def real(cls) -> "LaVITConfig":
        """The sizes of LaVIT-7B-v2 (EVA ViT-g/14 at 224 px, 12-block merger and detokenizer)."""
        return cls()

    @classmethod
    def tiny(cls) -> "LaVITConfig":
        """The sizes of the golden tiny fixtures (``lavit_tiny``; :meth:`from_golden` reads them from its
        ``config.json``)."""
        width = 64
        hidden = eva_mlp_hidden(width)  # 279
        encoder = EVAConfig(img_size=112, patch_size=14, width=width, depth=2, num_heads=4,
                            mlp_hidden=hidden, head_dim_out=32)
        tokenizer = TokenizerConfig(encoder=encoder, merger_depth=2, merger_heads=4,
                                    merger_mlp_hidden=hidden, n_code=512, code_dim=32, llm_dim=64)
        decoder = DecoderConfig(num_queries=encoder.num_patches, code_dim=32, width=width, depth=2,
                                num_heads=4, mlp_hidden=hidden, out_dim=64, unet_proj_1_dim=24,
                                unet_proj_2_dim=40, pooled_dim=40, lowres_unet_proj_dim=24)
        return cls(tokenizer=tokenizer, decoder=decoder)

    @classmethod
    def from_golden(cls, config: Mapping[str, Any]) -> "LaVITConfig":
        """The sizes recorded in a golden fixture set's ``config.json`` (already parsed, e.g. ``json.load``).

        Reads, under ``config["fixtures"]``: the ``constructor`` entries of ``visual_encoder`` (EVA),
        ``token_merger_quantizer`` (merger + quantizer; plus its ``masked_softmax_eps``) and ``highres_decoder``
        (detokenizer trunk; plus its ``num_queries``), the LayerNorm eps written in their ``norm_layer``
        (``"LayerNorm(eps=1e-6)…"``), ``preprocess`` ``mean`` / ``std`` and the top-level ``id_layout``.
        MLP hidden widths follow upstream's rule ``int(width * mlp_ratio)``. The widths that upstream
        hard-codes, and that a fixture set therefore rebuilds at its own size, are read from the recorded
        weight shapes (``[out, in]``): ``vit_proj.weight`` (→ ``llm_dim``), ``decode_task_layer.2.weight``
        (→ ``out_dim``), ``unet_proj_1.weight`` / ``unet_proj_2.weight`` / ``unet_attnpool.c_proj.weight``
        and the lowres ``unet_proj.weight``. A missing entry raises ``KeyError`` naming it.
        """
        fx = config["fixtures"]
        eva = fx["visual_encoder"]["constructor"]
        merger = fx["token_merger_quantizer"]["constructor"]["TokenMerger"]
        quant = fx["token_merger_quantizer"]["constructor"]["VectorQuantizer"]
        dec = fx["highres_decoder"]["constructor"]
        tok_shapes = fx["dynamic_tokenizer_state_dict"]["weights"]["shapes"]
        dec_shapes = fx["highres_decoder"]["weights"]["shapes"]
        lowres_shapes = fx["lowres_decoder"]["full_state_dict"]
        ids = config["id_layout"]
        pre = fx["preprocess"]

        encoder = EVAConfig(img_size=eva["img_size"], patch_size=eva["patch_size"], in_chans=eva["in_chans"],
                            width=eva["embed_dim"], depth=eva["depth"], num_heads=eva["num_heads"],
                            mlp_hidden=eva_mlp_hidden(eva["embed_dim"], eva["mlp_ratio"]),
                            head_dim_out=eva["num_classes"], layer_norm_eps=_norm_eps(eva["norm_layer"]))
        if merger["dim"] != encoder.width:
            raise ValueError(f"token merger width {merger['dim']} != EVA width {encoder.width}")
        tokenizer = TokenizerConfig(encoder=encoder, merger_depth=merger["depth"], merger_heads=merger["num_heads"],
                                    merger_mlp_hidden=eva_mlp_hidden(merger["dim"], merger["mlp_ratio"]),
                                    n_code=quant["n_embed"], code_dim=quant["embedding_dim"],
                                    llm_dim=tok_shapes["vit_proj.weight"][0],
                                    layer_norm_eps=_norm_eps(merger["norm_layer"]),
                                    masked_softmax_eps=fx["token_merger_quantizer"]["masked_softmax_eps"])
        decoder = DecoderConfig(num_queries=fx["highres_decoder"]["num_queries"], code_dim=dec["in_chans"],
                                width=dec["embed_dim"], depth=dec["depth"], num_heads=dec["num_heads"],
                                mlp_hidden=eva_mlp_hidden(dec["embed_dim"], dec["mlp_ratio"]),
                                out_dim=dec_shapes["decode_task_layer.2.weight"][0],
                                unet_proj_1_dim=dec_shapes["unet_proj_1.weight"][0],
                                unet_proj_2_dim=dec_shapes["unet_proj_2.weight"][0],
                                pooled_dim=dec_shapes["unet_attnpool.c_proj.weight"][0],
                                lowres_unet_proj_dim=lowres_shapes["unet_proj.weight"][0],
                                layer_norm_eps=_norm_eps(dec["norm_layer"]))
        token_ids = TokenIds(image_start=ids["image_start"], image_end=ids["image_end"],
                             visual_offset=ids["visual_id_offset"], pad=ids["pad"])
        return cls(tokenizer=tokenizer, decoder=decoder, ids=token_ids, image_mean=tuple(pre["mean"]),
                   image_std=tuple(pre["std"]))


_EPS = re.compile(r"\beps\s*=\s*([0-9.]+(?:[eE][-+]?[0-9]+)?)")


def _norm_eps(norm_layer: str) -> float:
    """The eps of a recorded ``norm_layer`` description such as ``"LayerNorm(eps=1e-6), computed in fp32"``."""
    match = _EPS.search(str(norm_layer))
    if match is None:
        raise ValueError(f"no LayerNorm eps in the norm_layer entry {norm_layer!r}")
    return float(match.group(1))
