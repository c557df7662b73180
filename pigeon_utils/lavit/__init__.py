"""Clean-room re-implementation of LaVIT-7B-v2's custom modules (visual tokenizer and detokenizer).

LaVIT turns an image into a variable number of discrete visual tokens for a LLaMA-2-7B LLM and turns
generated visual tokens back into SDXL-style UNet conditioning:

* :class:`LaVITImageProcessor`: PIL bicubic resize + CLIP normalisation.
* :class:`EVAVisionTransformer`: EVA-CLIP ViT-g/14 encoder (features before the final norm).
* :class:`DynamicVisualTokenizer`: token predictor, token merger, quantizer -> code ids.
* :class:`HighresVQDecoder` / :class:`VQDecoder`: code ids -> UNet conditioning.
* :mod:`pigeon_utils.lavit.checkpoint`: loading these parts from a ``rain1011/LaVIT-7B-v2`` folder.
* :func:`load_lavit_backbone` (:mod:`pigeon_utils.lavit.backbone`): the whole checkpoint as a
  :class:`pigeon_utils.backbone.Backbone`, with the LLM and text tokenizer (:mod:`pigeon_utils.lavit.language_model`)
  and the SDXL-style pixel decoder (:mod:`pigeon_utils.lavit.pixel_decoder`); its errors are in
  :mod:`pigeon_utils.lavit.errors`. :func:`write_tiny_checkpoint`: a tiny random checkpoint in the same layout.
* :mod:`pigeon_utils.lavit.extractors`: the evaluation feature extractors, from local files only.

Parameter names follow upstream (jy0205/LaVIT) so the published state dicts load strictly; sizes come
from :class:`LaVITConfig` (``real()`` / ``tiny()``).
"""
from pigeon_utils.lavit.config import (
    DecoderConfig,
    EVAConfig,
    LaVITConfig,
    TokenIds,
    TokenizerConfig,
)
from pigeon_utils.lavit.backbone import load_lavit_backbone
from pigeon_utils.lavit.decoder import HighresVQDecoder, VQDecoder
from pigeon_utils.lavit.errors import LaVITMissingFileError, LaVITWeightsError
from pigeon_utils.lavit.eva import EVAVisionTransformer
from pigeon_utils.lavit.ids import codes_to_llm_ids, llm_ids_to_codes
from pigeon_utils.lavit.preprocess import LaVITImageProcessor
from pigeon_utils.lavit.tokenizer import (
    DynamicVisualTokenizer,
    TokenizerOutput,
    VectorQuantizer,
    sample_keep_decision,
)
from pigeon_utils.lavit.tiny_checkpoint import write_tiny_checkpoint

__all__ = [
    "DecoderConfig",
    "DynamicVisualTokenizer",
    "EVAConfig",
    "EVAVisionTransformer",
    "HighresVQDecoder",
    "LaVITConfig",
    "LaVITImageProcessor",
    "LaVITMissingFileError",
    "LaVITWeightsError",
    "TokenIds",
    "TokenizerConfig",
    "TokenizerOutput",
    "VQDecoder",
    "VectorQuantizer",
    "codes_to_llm_ids",
    "llm_ids_to_codes",
    "load_lavit_backbone",
    "sample_keep_decision",
    "write_tiny_checkpoint",
]
