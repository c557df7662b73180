"""A tiny LaVIT checkpoint folder in the real ``rain1011/LaVIT-7B-v2`` layout, with random weights.

It lets ``preset="lavit"`` run end to end anywhere (CI, a laptop) through exactly the code path of the real
checkpoint: the same files, formats and loaders, only smaller::

    <out>/
      lavit_config.json                     sizes of the custom modules (LaVITConfig.tiny()); absent in the real one
      language_model/                       tiny LlamaForCausalLM (hidden 64, 2 layers, tied embeddings,
                                            vocab 32002 + 512) + a LLaMA-style BPE tokenizer (no sentencepiece)
        config.json  generation_config.json  model.safetensors
        tokenizer.json  tokenizer_config.json
        visual_weight.bin                   token merger + vit_proj (understanding only)
      visual_tokenizer/
        eva_vitg_psz14.bin  tokenizer_encoder.bin  highres_tokenizer_decoder.bin  tokenizer_decoder.bin
      highres_pixel_decoding/
        unet/{config.json, diffusion_pytorch_model.bin}        SDXL-style (text_time), 64×64 output
        vae/{config.json, diffusion_pytorch_model.safetensors}
        scheduler/scheduler_config.json                        DDIM

The id layout is LaVIT's: the text tokenizer has exactly 32000 entries (a few hundred real BPE pieces trained
offline on Pigeon's prompt text, then unused filler entries), so Pigeon's ``<img>`` / ``<emb>`` land on 32000 / 32001;
visual id = 32002 + code. Everything is deterministic given ``seed``; the folder takes ~15 MB.

CLI: ``python -m pigeon_utils.lavit.tiny_checkpoint --out checkpoints/lavit-tiny``.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from pigeon_utils.lavit.backbone import CONFIG_FILE, config_to_dict, layout_for
from pigeon_utils.lavit.config import LaVITConfig
from pigeon_utils.lavit.decoder import HighresVQDecoder, VQDecoder
from pigeon_utils.lavit.tokenizer import DynamicVisualTokenizer
from pigeon_utils.prompts import TEMPLATES

#: tiny LLM; hidden = the tiny tokenizer's vit_proj width (64).
TINY_LLM = dict(intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True)
#: number of entries of LaVIT's LLaMA text tokenizer (ids 0..31999); Pigeon's added tokens follow.
TEXT_VOCAB = 32000
BPE_PIECES = 700
#: a little generic English besides the prompt templates, so that ordinary words get whole pieces.
_EXTRA_TEXT = (
    "a sticker of a cat, a dog, a heart, a star, a circle, a square, a flower, a smiling face showing happiness, "
    "sadness, anger, surprise, love, fear, joy, calm, excitement. a poster of an action, comedy, drama, horror, "
    "romance, thriller, science fiction, animation, documentary, adventure, fantasy, crime, family movie with a "
    "red, blue, green, yellow, purple, orange, black, white, pink background, bright colours, dark tones, bold text, "
    "the title, the hero, a city at night, a forest, the sea, mountains, people, a man and a woman, two friends.")


def _corpus() -> list[str]:
    out = []
    for t in TEMPLATES.values():
        out += [t.instruction, t.task_description, t.prompt_start, t.history_start, t.target_start, t.prompt_end]
    return out + [s.strip() for s in _EXTRA_TEXT.split(".") if s.strip()]


def build_text_tokenizer(n_entries: int = TEXT_VOCAB, n_pieces: int = BPE_PIECES):
    """A LLaMA-style tokenizer (``<unk>``, ``<s>``, ``</s>``, 256 byte-fallback pieces, Metaspace BPE) with exactly
    `n_entries` entries: BPE pieces trained (deterministically) on Pigeon's prompt text, then unused fillers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bpe.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=n_pieces, special_tokens=["<unk>", "<s>", "</s>"],
                                                           show_progress=False))
    model = json.loads(bpe.to_str())["model"]
    trained = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece, _ in trained:
        vocab.setdefault(piece, len(vocab))
    if len(vocab) > n_entries:
        raise ValueError(f"{len(vocab)} base pieces do not fit in {n_entries} entries")
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), n_entries)})
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges)
    if len(tok) != n_entries:
        raise AssertionError(f"tiny tokenizer has {len(tok)} entries, expected {n_entries}")
    return tok


def tiny_unet_config(cond_dim: int, pooled_dim: int, sample_size: int = 8) -> dict:
    """A small ``UNet2DConditionModel`` with SDXL's conditioning interface (``text_time``, 6 time ids)."""
    time_dim = 8
    return dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 1), cross_attention_dim=cond_dim, norm_num_groups=8,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim)


def tiny_vae_config() -> dict:
    """A small ``AutoencoderKL`` with SDXL's 8× downsampling and 4 latent channels."""
    return dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
                block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64, scaling_factor=0.13025)


#: SDXL's noise schedule, used by LaVIT's DDIM sampler.
DDIM_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                   prediction_type="epsilon")


def _save_bin(state: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone().contiguous() for k, v in state.items()}, path)


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, config: LaVITConfig | None = None,
                          overwrite: bool = False) -> Path:
    """Write a complete tiny LaVIT checkpoint folder (real layout, random weights) and return its path.

    `config` defaults to :meth:`LaVITConfig.tiny` (112-px images, 8×8 patches, 512 codes). An existing non-empty
    `out_dir` is replaced only with ``overwrite=True``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (CLI: --overwrite)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config or LaVITConfig.tiny()
    layout = layout_for(cfg)
    (out / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # visual tokenizer: EVA alone (no prefix), the rest of the tokenizer, understanding weights
        tok = DynamicVisualTokenizer(cfg.tokenizer)
        state = tok.state_dict()
        vt = out / "visual_tokenizer"
        _save_bin(tok.encoder.state_dict(), vt / "eva_vitg_psz14.bin")
        _save_bin({k: v for k, v in state.items() if not k.startswith("encoder.")}, vt / "tokenizer_encoder.bin")
        _save_bin({k: v for k, v in state.items() if k.startswith(("causal_encoder.", "vit_proj."))},
                  out / "language_model" / "visual_weight.bin")
        high = HighresVQDecoder(cfg.decoder)
        _save_bin(high.state_dict(), vt / "highres_tokenizer_decoder.bin")
        _save_bin(VQDecoder(cfg.decoder).state_dict(), vt / "tokenizer_decoder.bin")

        # LLM: vocab = 32000 text + [IMG] + [/IMG] + codebook
        llm_cfg = LlamaConfig(vocab_size=layout.vocab_size, hidden_size=cfg.tokenizer.llm_dim, bos_token_id=1,
                              eos_token_id=2, **TINY_LLM)
        LlamaForCausalLM(llm_cfg).save_pretrained(out / "language_model")
        build_text_tokenizer(layout.img_id).save_pretrained(out / "language_model")

        # pixel decoder: UNet as .bin (upstream reads only the .bin), VAE as safetensors, DDIM config
        pd = out / "highres_pixel_decoding"
        UNet2DConditionModel(**tiny_unet_config(cfg.decoder.prompt_dim, cfg.decoder.pooled_dim)).save_pretrained(
            pd / "unet", safe_serialization=False)
        AutoencoderKL(**tiny_vae_config()).save_pretrained(pd / "vae")
        DDIMScheduler(**DDIM_CONFIG).save_pretrained(pd / "scheduler")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pigeon_utils.lavit.tiny_checkpoint",
                                description="Write a tiny random LaVIT checkpoint in the real folder layout.")
    p.add_argument("--out", default="checkpoints/lavit-tiny", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty folder")
    args = p.parse_args(argv)
    path = write_tiny_checkpoint(args.out, seed=args.seed, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"wrote {path} ({size / 1e6:.1f} MB); load it with load_backbone('lavit', '{path}')")


if __name__ == "__main__":
    main()
