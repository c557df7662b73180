"""Load LaVIT's visual tokenizer and detokenizer from a ``rain1011/LaVIT-7B-v2`` checkpoint folder.

Layout read here (only the custom parts; the LLM and diffusion folders are library classes)::

    <root>/
      language_model/
        visual_weight.bin                 understanding only: token merger + vit_proj (non-strict)
      visual_tokenizer/
        eva_vitg_psz14.bin                EVA ViT-g state dict, no prefix (strict)
        tokenizer_encoder.bin             DynamicVisualTokenizer minus EVA (non-strict upstream)
        highres_tokenizer_decoder.bin     HighresVQDecoder (strict)
        tokenizer_decoder.bin             VQDecoder, lowres (strict)
      highres_pixel_decoding/{unet,vae,scheduler}/

Every weight file may be a ``.bin`` (read with ``torch.load(map_location="cpu", weights_only=True)``)
or a ``.safetensors`` file with the same stem (the ``.safetensors`` one wins when both exist).

Policy: strict files must match the module exactly. For the two files upstream loads non-strictly, the
keys the module needs are *required* (a missing one is an error), keys the module does not have are
reported (returned and warned about), never renamed or guessed.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pigeon_utils.lavit.config import LaVITConfig
from pigeon_utils.lavit.decoder import HighresVQDecoder, VQDecoder
from pigeon_utils.lavit.eva import EVAVisionTransformer
from pigeon_utils.lavit.tokenizer import DynamicVisualTokenizer, VectorQuantizer

HUB_ID = "rain1011/LaVIT-7B-v2"

EXPECTED_LAYOUT = """\
<checkpoint>/
  language_model/                      LlamaForCausalLM + LlamaTokenizer (config.json, tokenizer.model, weights)
    visual_weight.bin                  (understanding only)
  visual_tokenizer/
    eva_vitg_psz14.bin
    tokenizer_encoder.bin
    highres_tokenizer_decoder.bin
    tokenizer_decoder.bin              (lowres pixel decoding only)
  highres_pixel_decoding/
    unet/  vae/  scheduler/"""

#: weight files by role: (sub-folder, file stem)
EVA_FILE = ("visual_tokenizer", "eva_vitg_psz14")
TOKENIZER_ENCODER_FILE = ("visual_tokenizer", "tokenizer_encoder")
HIGHRES_DECODER_FILE = ("visual_tokenizer", "highres_tokenizer_decoder")
LOWRES_DECODER_FILE = ("visual_tokenizer", "tokenizer_decoder")
VISUAL_WEIGHT_STEM = "visual_weight"

#: prefixes of the tokenizer that ``tokenizer_encoder.bin`` must fill.
TOKENIZER_ENCODER_REQUIRED = ("token_predictor.", "causal_encoder.", "encode_task_layer.", "quantize.embedding.weight")
#: what ``visual_weight.bin`` must fill for understanding.
VISUAL_WEIGHT_REQUIRED = ("vit_proj.",)
CODEBOOK_KEY = "quantize.embedding.weight"


class LaVITCheckpointError(FileNotFoundError):
    """A file of the LaVIT checkpoint layout is missing (the message shows the expected layout)."""

    def __init__(self, root: Path, missing: Path, role: str) -> None:
        self.root, self.missing, self.role = Path(root), Path(missing), role
        super().__init__(
            f"LaVIT checkpoint file missing: {missing} ({role}).\n"
            f"Checkpoint folder: {root}\n"
            f"Expected layout:\n{EXPECTED_LAYOUT}\n"
            f"Download the checkpoint {HUB_ID} from the Hugging Face Hub (for example "
            f"`huggingface-cli download {HUB_ID} --local-dir {root}`) and pass that folder; each weight "
            f"file may be .bin or .safetensors.")


class StateDictMismatchError(RuntimeError):
    """The keys (or shapes) of a weight file do not fit the module they are loaded into."""

    def __init__(self, path: Path, module: str, missing: list[str], unexpected: list[str],
                 shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> None:
        self.path, self.missing_keys, self.unexpected_keys = Path(path), missing, unexpected
        self.shape_mismatches = shapes or {}

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:20]) + (f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else "") or "none"

        msg = (f"{path} does not fit {module}: {len(missing)} missing keys [{show(missing)}]; "
               f"{len(unexpected)} unexpected keys [{show(unexpected)}]")
        if self.shape_mismatches:
            msg += "; shape mismatches (file vs module): " + ", ".join(
                f"{k}: {list(f)} vs {list(m)}" for k, (f, m) in list(self.shape_mismatches.items())[:20])
        super().__init__(msg)


@dataclass
class LoadReport:
    """What one weight file filled in a module."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.bin``/``.pt`` (weights-only torch.load on CPU) or ``.safetensors``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise TypeError(f"{path}: expected a flat state dict (str -> Tensor), got {type(state).__name__}"
                        + (f" with keys {list(state)[:10]}" if isinstance(state, dict) else ""))
    return state


class LaVITCheckpoint:
    """Paths of a LaVIT-7B-v2 checkpoint folder and loaders for its custom (non-library) parts."""

    def __init__(self, root: str | Path, config: LaVITConfig | None = None,
                 language_model_dir: str = "language_model") -> None:
        self.root = Path(root)
        self.config = config or LaVITConfig.real()
        self.language_model_dir = language_model_dir
        if not self.root.is_dir():
            raise LaVITCheckpointError(self.root, self.root, "the checkpoint folder itself")

    # -- paths --------------------------------------------------------------------------------
    def weight_file(self, folder: str, stem: str, role: str) -> Path:
        """``<root>/<folder>/<stem>.safetensors`` or ``.bin``; :class:`LaVITCheckpointError` if neither."""
        base = self.root / folder
        for suffix in (".safetensors", ".bin"):
            candidate = base / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
        raise LaVITCheckpointError(self.root, base / f"{stem}.bin", role)

    @property
    def language_model(self) -> Path:
        return self.root / self.language_model_dir

    @property
    def highres_pixel_decoding(self) -> dict[str, Path]:
        return {name: self.root / "highres_pixel_decoding" / name for name in ("unet", "vae", "scheduler")}

    def require_dirs(self, names: Iterable[str] = ("language_model", "highres_pixel_decoding")) -> None:
        """Check that the library-class folders exist (``language_model`` and/or the SDXL parts)."""
        for name in names:
            paths = {"language_model": [self.language_model],
                     "highres_pixel_decoding": list(self.highres_pixel_decoding.values())}.get(name)
            if paths is None:
                raise ValueError(f"unknown checkpoint part {name!r}")
            for p in paths:
                if not p.is_dir():
                    raise LaVITCheckpointError(self.root, p, f"folder of {name}")

    # -- loading ------------------------------------------------------------------------------
    @staticmethod
    def _load(module: nn.Module, path: Path, state: dict[str, torch.Tensor], what: str,
              required: tuple[str, ...] | None = None) -> LoadReport:
        """Strict when ``required`` is None; else every module key under ``required`` must be filled."""
        own = module.state_dict()
        unexpected = sorted(k for k in state if k not in own)
        missing_all = sorted(k for k in own if k not in state)
        if required is None:
            if missing_all or unexpected:
                raise StateDictMismatchError(path, what, missing_all, unexpected)
        else:
            needed = [k for k in missing_all if k.startswith(required)]
            if needed:
                raise StateDictMismatchError(path, what, needed, unexpected)
            if unexpected:
                warnings.warn(f"{path}: {len(unexpected)} keys not used by {what}: {unexpected[:10]}",
                              stacklevel=3)
        shapes = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and own[k].shape != v.shape}
        if shapes:
            raise StateDictMismatchError(path, what, [], [], shapes)
        module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=required is None)
        return LoadReport(path=path, loaded=sorted(k for k in state if k in own), missing_keys=missing_all,
                          unexpected_keys=unexpected)

    def load_eva(self, module: EVAVisionTransformer | None = None) -> EVAVisionTransformer:
        """EVA ViT-g from ``visual_tokenizer/eva_vitg_psz14.bin`` (strict, no prefix)."""
        eva = module if module is not None else EVAVisionTransformer(self.config.tokenizer.encoder)
        path = self.weight_file(*EVA_FILE, role="EVA ViT-g encoder weights")
        self._load(eva, path, read_state_dict(path), "EVAVisionTransformer")
        return eva.eval()

    def load_visual_tokenizer(self, for_understanding: bool = False
                              ) -> tuple[DynamicVisualTokenizer, list[LoadReport]]:
        """The dynamic visual tokenizer, as upstream ``build_dynamic_tokenizer``:

        1. EVA strictly from ``eva_vitg_psz14.bin``;
        2. ``tokenizer_encoder.bin`` over the whole tokenizer: predictor, merger, task layer and
           codebook are required; ``encoder.*`` entries, if present, override the EVA weights (as
           upstream); other unknown keys are reported;
        3. for understanding, ``<language_model>/visual_weight.bin`` (merger override + ``vit_proj``).
        """
        tok = DynamicVisualTokenizer(self.config.tokenizer)
        eva_path = self.weight_file(*EVA_FILE, role="EVA ViT-g encoder weights")
        reports = [self._load(tok.encoder, eva_path, read_state_dict(eva_path), "DynamicVisualTokenizer.encoder")]
        enc_path = self.weight_file(*TOKENIZER_ENCODER_FILE, role="visual tokenizer encoder weights")
        reports.append(self._load(tok, enc_path, read_state_dict(enc_path), "DynamicVisualTokenizer",
                                  required=TOKENIZER_ENCODER_REQUIRED))
        if for_understanding:
            vw_path = self.weight_file(self.language_model_dir, VISUAL_WEIGHT_STEM,
                                       role="understanding weights of the token merger and vit_proj")
            reports.append(self._load(tok, vw_path, read_state_dict(vw_path), "DynamicVisualTokenizer",
                                      required=VISUAL_WEIGHT_REQUIRED))
        return tok.eval(), reports

    def load_codebook(self) -> VectorQuantizer:
        """Text-to-image without the tokenizer: only ``quantize.embedding.weight`` of tokenizer_encoder.bin."""
        path = self.weight_file(*TOKENIZER_ENCODER_FILE, role="visual tokenizer encoder weights (codebook)")
        state = read_state_dict(path)
        if CODEBOOK_KEY not in state:
            raise StateDictMismatchError(path, "VectorQuantizer", [CODEBOOK_KEY], [])
        cfg = self.config.tokenizer
        quant = VectorQuantizer(cfg.n_code, cfg.code_dim)
        self._load(quant, path, {"embedding.weight": state[CODEBOOK_KEY]}, "VectorQuantizer")
        return quant.eval()

    def load_highres_decoder(self) -> HighresVQDecoder:
        """Highres detokenizer from ``visual_tokenizer/highres_tokenizer_decoder.bin`` (strict)."""
        dec = HighresVQDecoder(self.config.decoder)
        path = self.weight_file(*HIGHRES_DECODER_FILE, role="highres detokenizer weights")
        self._load(dec, path, read_state_dict(path), "HighresVQDecoder")
        return dec.eval()

    def load_lowres_decoder(self) -> VQDecoder:
        """Lowres detokenizer from ``visual_tokenizer/tokenizer_decoder.bin`` (strict)."""
        dec = VQDecoder(self.config.decoder)
        path = self.weight_file(*LOWRES_DECODER_FILE, role="lowres detokenizer weights")
        self._load(dec, path, read_state_dict(path), "VQDecoder")
        return dec.eval()
