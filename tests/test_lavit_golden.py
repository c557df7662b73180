"""pigeon_utils.lavit reproduces the LaVIT tiny golden fixtures (shared/golden/lavit_tiny).

Every stored tensor of the six LaVIT fixtures (preprocess, visual_encoder, token_predictor,
token_merger_quantizer, highres_decoder, lowres_decoder) is recomputed from the stored inputs with
strictly loaded weights. Floats: ``assert_close(atol=config.json tolerance, rtol=1e-5)``; ids, counts
and images: exact.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pigeon_utils.lavit import (
    DynamicVisualTokenizer,
    EVAVisionTransformer,
    HighresVQDecoder,
    LaVITConfig,
    LaVITImageProcessor,
    VQDecoder,
    codes_to_llm_ids,
    llm_ids_to_codes,
    sample_keep_decision,
)
from pigeon_utils.lavit.tokenizer import policy_softmax

pytestmark = pytest.mark.shared

RTOL = 1e-5
HIGHRES_ONLY = ("unet_proj_1.", "unet_proj_2.", "unet_attnpool.")


@pytest.fixture(scope="module")
def gconfig(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def cfg() -> LaVITConfig:
    return LaVITConfig.tiny()


def _atol(gconfig: dict, fixture: str) -> float:
    return float(gconfig["fixtures"][fixture]["tolerance"]["recommended"]["atol"])


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _exact(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    mism = (actual != expected).sum().item()
    assert mism == 0, f"{what}: {mism} of {actual.numel()} entries differ"


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=True)
    assert not result.missing_keys, f"{what}: missing keys {result.missing_keys}"
    assert not result.unexpected_keys, f"{what}: unexpected keys {result.unexpected_keys}"
    module.eval()


def _io(golden_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(golden_dir / f"{name}.io.safetensors"))


def _check_io_shapes(gconfig: dict, fixture: str, tensors: dict[str, torch.Tensor]) -> None:
    """The stored files hold exactly the tensors config.json describes (guards against stale fixtures)."""
    described = gconfig["fixtures"][fixture]["io"]["tensors"]
    assert set(tensors) == set(described), f"{fixture}: io tensors {sorted(tensors)} != {sorted(described)}"
    for name, meta in described.items():
        assert list(tensors[name].shape) == meta["shape"], f"{fixture}.{name}: shape {tuple(tensors[name].shape)}"


@pytest.fixture(scope="module")
def encoder_io(golden_dir: Path) -> dict[str, torch.Tensor]:
    return _io(golden_dir, "visual_encoder")


@pytest.fixture(scope="module")
def tokenizer(golden_dir: Path, cfg: LaVITConfig) -> DynamicVisualTokenizer:
    tok = DynamicVisualTokenizer(cfg.tokenizer)
    _load_strict(tok, load_file(str(golden_dir / "dynamic_tokenizer.weights.safetensors")), "DynamicVisualTokenizer")
    return tok


@pytest.fixture(scope="module")
def highres(golden_dir: Path, cfg: LaVITConfig) -> HighresVQDecoder:
    dec = HighresVQDecoder(cfg.decoder)
    _load_strict(dec, load_file(str(golden_dir / "highres_decoder.weights.safetensors")), "HighresVQDecoder")
    return dec


# --------------------------------------------------------------------------------------------------
# 0. preprocessing
def test_preprocess(golden_dir: Path, gconfig: dict, cfg: LaVITConfig, encoder_io) -> None:
    io = _io(golden_dir, "preprocess")
    _check_io_shapes(gconfig, "preprocess", io)
    meta = gconfig["fixtures"]["preprocess"]
    assert tuple(meta["mean"]) == cfg.image_mean and tuple(meta["std"]) == cfg.image_std
    proc = LaVITImageProcessor(cfg.image_size)
    raws = [io["raw_image_0"].numpy(), io["raw_image_1"].numpy()]
    resized = torch.stack([torch.from_numpy(proc.resize(r)) for r in raws])
    _exact(resized, io["resized_uint8"], "preprocess.resized_uint8")
    pixel_values = proc(raws)
    _close(pixel_values, encoder_io["pixel_values"], _atol(gconfig, "preprocess"), "preprocess -> pixel_values")


# --------------------------------------------------------------------------------------------------
# 1. EVA visual encoder
def test_visual_encoder(golden_dir: Path, gconfig: dict, cfg: LaVITConfig, encoder_io) -> None:
    _check_io_shapes(gconfig, "visual_encoder", encoder_io)
    eva = EVAVisionTransformer(cfg.tokenizer.encoder)
    state = load_file(str(golden_dir / "visual_encoder.weights.safetensors"))
    assert len(state) == gconfig["fixtures"]["visual_encoder"]["weights"]["n_tensors"] == 34
    _load_strict(eva, state, "EVAVisionTransformer")
    atol = _atol(gconfig, "visual_encoder")
    x = encoder_io["pixel_values"]
    with torch.no_grad():
        emb = eva.embed(x)
        _close(emb, encoder_io["embeddings"], atol, "visual_encoder.embeddings")
        _close(eva.blocks[0](emb), encoder_io["block_0_out"], atol, "visual_encoder.block_0_out")
        _close(eva.forward_features(x), encoder_io["features_all_tokens"], atol,
               "visual_encoder.features_all_tokens")
        _close(eva.patch_features(x), encoder_io["features"], atol, "visual_encoder.features")
        _close(eva(x), encoder_io["head_output"], atol, "visual_encoder.head_output")
        _close(eva.forward_features(x * 1e-3), encoder_io["features_all_tokens_eps_probe"], atol,
               "visual_encoder.features_all_tokens_eps_probe")


def test_tokenizer_state_dict(golden_dir: Path, gconfig: dict, cfg: LaVITConfig) -> None:
    state = load_file(str(golden_dir / "dynamic_tokenizer.weights.safetensors"))
    meta = gconfig["fixtures"]["dynamic_tokenizer_state_dict"]
    assert len(state) == meta["n_tensors"] == 99
    tok = DynamicVisualTokenizer(cfg.tokenizer)
    ours = {k: list(v.shape) for k, v in tok.state_dict().items()}
    assert ours == meta["weights"]["shapes"]
    _load_strict(tok, state, "DynamicVisualTokenizer")
    encoder_state = load_file(str(golden_dir / "visual_encoder.weights.safetensors"))
    for key, value in encoder_state.items():
        assert torch.equal(tok.encoder.state_dict()[key], value), f"encoder.{key} differs from visual_encoder.weights"


# --------------------------------------------------------------------------------------------------
# 2. token predictor
def test_token_predictor(golden_dir: Path, gconfig: dict, tokenizer, encoder_io) -> None:
    io = _io(golden_dir, "token_predictor")
    _check_io_shapes(gconfig, "token_predictor", io)
    atol = _atol(gconfig, "token_predictor")
    features = encoder_io["features"]
    with torch.no_grad():
        _close(tokenizer.token_predictor(features, io["policy"]), io["pred_score"], atol, "token_predictor.pred_score")
        _close(tokenizer.predict_keep_scores(features), io["pred_score"], atol, "predict_keep_scores")
        _close(tokenizer.token_predictor(features * 1e-3, io["policy"]), io["pred_score_scaled"], atol,
               "token_predictor.pred_score_scaled")


# --------------------------------------------------------------------------------------------------
# 3. token merger + quantizer
def test_token_merger_quantizer(golden_dir: Path, gconfig: dict, cfg: LaVITConfig, tokenizer, encoder_io) -> None:
    io = _io(golden_dir, "token_merger_quantizer")
    _check_io_shapes(gconfig, "token_merger_quantizer", io)
    atol = _atol(gconfig, "token_merger_quantizer")
    features, keep = encoder_io["features"], io["keep_decision"]
    with torch.no_grad():
        merged = tokenizer.causal_encoder(features, keep)
        _close(merged, io["merged_features"], atol, "merged_features")
        _close(tokenizer.causal_encoder(features, io["keep_decision_edge"]), io["merged_features_edge"], atol,
               "merged_features_edge (image 1 keeps nothing)")
        _close(tokenizer.causal_encoder(features * 1e-3, keep), io["merged_features_scaled"], atol,
               "merged_features_scaled")
        kept = merged[keep.bool()]
        _close(kept, io["kept_features"], atol, "kept_features")
        task = tokenizer.task_features(io["kept_features"])
        _close(task, io["task_features"], atol, "task_features")
        _close(torch.nn.functional.normalize(task, dim=-1), io["task_features_l2norm"], atol, "task_features_l2norm")
        quantized, codes = tokenizer.quantize.tokenize(io["task_features"])
        _exact(codes, io["code_ids"], "quantize.tokenize(task_features) codes")
        _close(quantized, io["quantized"], atol, "quantized")

        # The real entry points, from features and from pixels, with the fixed decision.
        for out, src in ((tokenizer.tokenize_features(features, keep), "features"),
                         (tokenizer.tokenize(encoder_io["pixel_values"], keep), "pixel_values")):
            _exact(out.token_nums, io["token_nums"], f"tokenize({src}).token_nums")
            assert [len(c) for c in out.code_ids] == io["token_nums"].tolist()
            _exact(torch.cat(out.code_ids), io["code_ids"], f"tokenize({src}).code_ids")
            _close(out.quantized, io["quantized"], atol, f"tokenize({src}).quantized")
            _exact(torch.cat(out.llm_ids(cfg.ids)), io["visual_token_ids"], f"tokenize({src}) llm ids")
            _exact(torch.cat(out.llm_ids(cfg.ids, add_special=True)), io["visual_token_ids_with_special"],
                   f"tokenize({src}) llm ids with 32000/32001")
            for b, idx in enumerate(out.patch_indices):
                _exact(idx, keep[b].nonzero().flatten(), f"tokenize({src}).patch_indices[{b}]")
            _exact(out.keep, keep, f"tokenize({src}).keep")

        understanding = tokenizer.encode_features(encoder_io["pixel_values"], keep)
        assert [u.shape[0] for u in understanding] == io["token_nums"].tolist()
        _close(torch.cat(understanding), io["understanding_features"], atol, "understanding_features")

    assert codes_to_llm_ids([io["code_ids"][:2]], cfg.ids, add_special=True)[0].tolist() == [
        cfg.ids.image_start, *(io["code_ids"][:2] + cfg.ids.visual_offset).tolist(), cfg.ids.image_end]


def test_masked_softmax_rule() -> None:
    """Uniform 1/N for a query without allowed keys; max over ALL keys (disallowed ones drag it)."""
    logits = torch.tensor([[[[0.0, 50.0, 1.0], [3.0, 0.0, 0.0]]]])
    allowed = torch.tensor([[[[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]])
    p = policy_softmax(logits, allowed, eps=1e-6)
    torch.testing.assert_close(p[0, 0, 1], torch.full((3,), 1 / 3))
    # Row 0: the allowed keys sit ~50 below the global max, so exp() underflows and the row is ~uniform.
    torch.testing.assert_close(p[0, 0, 0], torch.full((3,), 1 / 3), atol=1e-6, rtol=0)
    near = policy_softmax(torch.tensor([[[[0.0, 1.0, 2.0]]]]), torch.tensor([[[[1.0, 0.0, 1.0]]]]))
    expected = torch.tensor([torch.e ** -2, 0.0, 1.0]) / (1 + torch.e ** -2)
    torch.testing.assert_close(near[0, 0, 0], expected, atol=1e-6, rtol=0)


def test_keep_decision_validation_and_sampling(tokenizer, encoder_io, golden_dir: Path) -> None:
    features = encoder_io["features"]
    with pytest.raises(ValueError, match=r"shape \[B, N\] = \[2, 64\]"):
        tokenizer.tokenize_features(features, torch.ones(2, 63))
    with pytest.raises(ValueError, match="only 0/1"):
        tokenizer.tokenize_features(features, torch.full((2, 64), 0.5))

    with torch.no_grad():
        a = tokenizer.tokenize_features(features, generator=torch.Generator().manual_seed(7))
        b = tokenizer.tokenize_features(features, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.keep, b.keep) and all(torch.equal(x, y) for x, y in zip(a.code_ids, b.code_ids))
    assert a.token_nums.tolist() == [len(c) for c in a.code_ids] == [len(p) for p in a.patch_indices]

    # Hard Gumbel sampling keeps patch i with probability exp(pred_score[..., 0]).
    pred = _io(golden_dir, "token_predictor")["pred_score"]
    n = 4000
    draws = sample_keep_decision(pred.expand(n, -1, -1, -1).reshape(n * 2, 64, 2),
                                 torch.Generator().manual_seed(0)).reshape(n, 2, 64)
    p_keep = pred[..., 0].exp()
    sigma = (p_keep * (1 - p_keep) / n).sqrt()
    dev = (draws.mean(0) - p_keep).abs()
    assert bool((dev <= 5 * sigma + 1e-3).all()), f"sampled keep rate deviates by up to {dev.max():.4f}"


# --------------------------------------------------------------------------------------------------
# 4. detokenizers
def test_highres_decoder(golden_dir: Path, gconfig: dict, cfg: LaVITConfig, tokenizer, highres) -> None:
    io = _io(golden_dir, "highres_decoder")
    _check_io_shapes(gconfig, "highres_decoder", io)
    assert len(highres.state_dict()) == gconfig["fixtures"]["highres_decoder"]["weights"]["n_tensors"] == 67
    atol = _atol(gconfig, "highres_decoder")
    codes, nums = llm_ids_to_codes(io["llm_sequences"], cfg.ids)
    _exact(codes, io["code_ids"], "llm_ids_to_codes code_ids")
    _exact(nums, io["token_nums"], "llm_ids_to_codes token_nums")
    codes_l, nums_l = llm_ids_to_codes(list(io["llm_sequences"]), cfg.ids)
    _exact(codes_l, io["code_ids"], "llm_ids_to_codes(list) code_ids")
    _exact(nums_l, io["token_nums"], "llm_ids_to_codes(list) token_nums")
    with torch.no_grad():
        rows = tokenizer.quantize(codes)
        _close(rows, io["codebook_rows"], atol, "codebook_rows")
        _close(highres.decode_queries(io["codebook_rows"], io["token_nums"]), io["visual_rec"], atol, "visual_rec")
        prompt, pooled = highres(io["codebook_rows"], io["token_nums"])
    _close(prompt, io["prompt_embeds"], atol, "prompt_embeds")
    _close(pooled, io["pooled_prompt_embeds"], atol, "pooled_prompt_embeds")


def test_lowres_decoder(golden_dir: Path, gconfig: dict, cfg: LaVITConfig) -> None:
    io = _io(golden_dir, "lowres_decoder")
    _check_io_shapes(gconfig, "lowres_decoder", io)
    meta = gconfig["fixtures"]["lowres_decoder"]
    state = {k: v for k, v in load_file(str(golden_dir / "highres_decoder.weights.safetensors")).items()
             if not k.startswith(HIGHRES_ONLY)}
    lowres_only = load_file(str(golden_dir / "lowres_decoder.weights.safetensors"))
    assert sorted(lowres_only) == ["unet_proj.bias", "unet_proj.weight"]
    state.update(lowres_only)
    dec = VQDecoder(cfg.decoder)
    assert {k: list(v.shape) for k, v in dec.state_dict().items()} == meta["full_state_dict"]
    _load_strict(dec, state, "VQDecoder")
    with torch.no_grad():
        out = dec(io["codebook_rows"], io["token_nums"])
    _close(out, io["prompt_embeds"], _atol(gconfig, "lowres_decoder"), "lowres prompt_embeds")


def test_decoder_input_errors(highres, cfg: LaVITConfig) -> None:
    rows = torch.zeros(3, cfg.decoder.code_dim)
    with pytest.raises(ValueError, match=r"sum\(token_nums\) = 4"):
        highres(rows, torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="at least one visual token"):
        highres(rows[:0], torch.tensor([0, 0]))
    too_many = cfg.decoder.num_queries + 1
    with pytest.raises(ValueError, match=f"{too_many} visual tokens"):
        highres(torch.zeros(too_many, cfg.decoder.code_dim), torch.tensor([too_many]))
