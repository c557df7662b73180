"""LaVIT's LLM and its text tokenizer, from ``<checkpoint>/language_model`` (local files only).

* :func:`load_language_model`: ``LlamaForCausalLM``, frozen, optionally 8-bit (bitsandbytes, CUDA only).
* :func:`load_text_tokenizer`: a ``tokenizer.json``, or the sentencepiece ``tokenizer.model`` LaVIT ships; Pigeon's
  ``<img>`` / ``<emb>`` must land on ids 32000 / 32001.
* :func:`check_language_model_files`: the config, weights and tokenizer exist (no weights are read).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pigeon_utils.backbone import CheckpointError
from pigeon_utils.lavit.errors import LaVITMissingFileError, check_loading_info, read_json, require_weights
from pigeon_utils.prompts import EMB_TOKEN, IMG_TOKEN, IdLayout

LANGUAGE_MODEL_DIR = "language_model"
LLM_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
TOKENIZER_ROLE = "LLaMA text tokenizer: tokenizer.model (sentencepiece) or tokenizer.json"


def check_language_model_files(root: Path) -> None:
    """``<root>/language_model`` holds the LLM config, its weights and a text tokenizer (no weights are read); the
    first missing one raises :class:`LaVITMissingFileError`."""
    root = Path(root)
    lm = root / LANGUAGE_MODEL_DIR
    if not (lm / "config.json").is_file():
        raise LaVITMissingFileError(root, lm / "config.json", "LlamaForCausalLM config")
    require_weights(lm, root, LLM_WEIGHT_FILES, "LlamaForCausalLM")
    if not any((lm / n).is_file() for n in TOKENIZER_FILES):
        raise LaVITMissingFileError(root, lm / "tokenizer.model", TOKENIZER_ROLE)


def load_language_model(root: Path, device: torch.device, dtype: torch.dtype, load_in_8bit: bool = False,
                        min_vocab: int | None = None) -> nn.Module:
    """``LlamaForCausalLM`` from ``<root>/language_model`` (local files only), frozen, in eval mode.

    Missing / shape-mismatched weights raise :class:`LaVITWeightsError`; unexpected keys are logged. The vocabulary
    must cover `min_vocab` ids (LaVIT: 32002 + 16384 = 48386).
    """
    from transformers import LlamaForCausalLM

    folder = Path(root) / LANGUAGE_MODEL_DIR
    read_json(folder / "config.json", root, "LlamaForCausalLM config")
    require_weights(folder, root, LLM_WEIGHT_FILES, "LlamaForCausalLM")
    kw: dict[str, Any] = dict(dtype=dtype, local_files_only=True, output_loading_info=True)
    if load_in_8bit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("load_in_8bit=True needs the bitsandbytes package (pip install bitsandbytes, CUDA "
                              "only); load in bf16 instead with load_in_8bit=False.")
        if device.type != "cuda":
            raise ValueError(f"load_in_8bit=True needs a CUDA device (bitsandbytes LLM.int8), got {device}")
        from transformers import BitsAndBytesConfig

        kw.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                  device_map={"": device.index if device.index is not None else torch.cuda.current_device()})
    model, info = LlamaForCausalLM.from_pretrained(folder, **kw)
    check_loading_info(info, folder, "LlamaForCausalLM")
    if min_vocab is not None and model.config.vocab_size < min_vocab:
        raise CheckpointError(f"{folder / 'config.json'}: vocab_size {model.config.vocab_size} < {min_vocab} "
                              f"= the id layout's text + [IMG] + [/IMG] + visual ids; this is not a LaVIT LLM.")
    if not load_in_8bit:
        model = model.to(device)
    return model.eval().requires_grad_(False)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def missing_sentencepiece_modules() -> list[str]:
    """What transformers needs to read a sentencepiece ``tokenizer.model`` and is not installed."""
    return [pkg for mod, pkg in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf"))
            if not _importable(mod)]


def load_text_tokenizer(root: Path, layout: IdLayout):
    """The LLM's text tokenizer (``tokenizer.json`` preferred, else LaVIT's sentencepiece ``tokenizer.model``), with
    Pigeon's ``<img>`` / ``<emb>`` added; they must get ``layout.img_id`` / ``layout.emb_id`` (32000 / 32001).

    Left padding with pad = ``</s>`` (id ``layout.pad_id``), as the reference.
    """
    from transformers import AutoTokenizer

    folder = Path(root) / LANGUAGE_MODEL_DIR
    present = [n for n in TOKENIZER_FILES if (folder / n).is_file()]
    if not present:
        raise LaVITMissingFileError(root, folder / "tokenizer.model", TOKENIZER_ROLE)
    if present == ["tokenizer.model"]:
        lacking = missing_sentencepiece_modules()
        if lacking:
            raise ImportError(f"{folder / 'tokenizer.model'} is a sentencepiece model; reading it needs "
                              f"{' and '.join(lacking)} (pip install sentencepiece protobuf). Alternatively save the "
                              f"tokenizer once as tokenizer.json in {folder}.")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vocab = tok.get_vocab()
    for token, want in ((IMG_TOKEN, layout.img_id), (EMB_TOKEN, layout.emb_id)):
        if token not in vocab:
            if len(tok) != want:
                raise CheckpointError(
                    f"{folder}: the text tokenizer has {len(tok)} entries, so adding {token!r} would give id "
                    f"{len(tok)}, not {want} as the LaVIT id layout needs (LaVIT's LLaMA tokenizer has 32000).")
            tok.add_tokens([token])
            vocab = tok.get_vocab()
        if vocab[token] != want:
            raise CheckpointError(f"{folder}: {token!r} has id {vocab[token]} in the text tokenizer, expected {want}")
    if tok.eos_token_id != layout.pad_id:
        raise CheckpointError(f"{folder}: eos token id {tok.eos_token_id}, expected {layout.pad_id} ('</s>', "
                              f"the pad id of the layout)")
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


__all__ = [
    "LANGUAGE_MODEL_DIR",
    "LLM_WEIGHT_FILES",
    "TOKENIZER_FILES",
    "check_language_model_files",
    "load_language_model",
    "load_text_tokenizer",
    "missing_sentencepiece_modules",
]
