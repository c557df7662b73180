"""pigeon_utils.lavit reproduces the LaVIT tiny golden fixtures (shared/golden/lavit_tiny).

Every stored tensor of the six LaVIT fixtures (preprocess, visual_encoder, token_predictor,
token_merger_quantizer, highres_decoder, lowres_decoder) is recomputed from the stored inputs with
strictly loaded weights. Floats: ``assert_close`` with the atol / rtol of config.json's
``tolerance.recommended``; ids, counts and images: exact.

Every size comes from the fixtures: the modules are built from config.json
(:meth:`LaVITConfig.from_golden`), batch sizes, token counts and image counts are read from the stored
tensors, and the eps-probe scales from the tensors' descriptions, so a fixture set at other sizes passes
unchanged.
"""
from __future__ import annotations

import json
import re
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

HIGHRES_ONLY = ("unet_proj_1.", "unet_proj_2.", "unet_attnpool.")


@pytest.fixture(scope="module")
def gconfig(golden_dir: Path) -> dict:
    return json.loads((golden_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def cfg(gconfig: dict) -> LaVITConfig:
    return LaVITConfig.from_golden(gconfig)


def _tol(gconfig: dict, fixture: str) -> tuple[float, float]:
    """(atol, rtol) of config.json → fixtures.<fixture>.tolerance.recommended."""
    rec = gconfig["fixtures"][fixture]["tolerance"]["recommended"]
    return float(rec["atol"]), float(rec["rtol"])


def _probe_scale(gconfig: dict, fixture: str, tensor: str) -> float:
    """The input scale of an eps probe, as its config.json description writes it (``features * 1e-3``)."""
    description = gconfig["fixtures"][fixture]["io"]["tensors"][tensor]["description"]
    scales = set(re.findall(r"\* ([0-9.]+(?:[eE][-+]?[0-9]+)?)", description))
    assert len(scales) == 1, f"{fixture}.{tensor}: no single input scale in {description!r}"
    return float(scales.pop())


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: tuple[float, float], what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    atol, rtol = tol
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


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


def test_config_entries_agree(gconfig: dict, cfg: LaVITConfig) -> None:
    """config.json states several sizes twice; LaVITConfig.from_golden reads one of each, the others agree."""
    fx = gconfig["fixtures"]
    enc, tok, dec = cfg.tokenizer.encoder, cfg.tokenizer, cfg.decoder
    assert fx["preprocess"]["constructor"]["image_size"] == enc.img_size
    derived = fx["visual_encoder"]["derived"]
    assert (derived["num_patches"], derived["tokens"], derived["head_dim"], derived["mlp_hidden"]) == (
        enc.num_patches, enc.num_patches + 1, enc.width // enc.num_heads, enc.mlp_hidden)
    assert fx["token_predictor"]["constructor"]["embed_dim"] == tok.width
    dyn = fx["dynamic_tokenizer_state_dict"]["constructor"]
    assert (dyn["img_size"], dyn["patch_size"], dyn["width"], dyn["layers"], dyn["heads"], dyn["n_code"],
            dyn["code_dim"]) == (enc.img_size, enc.patch_size, tok.width, tok.merger_depth, tok.merger_heads,
                                 tok.n_code, tok.code_dim)
    high, low = fx["highres_decoder"], fx["lowres_decoder"]
    assert low["constructor"] == high["constructor"]
    assert (high["constructor"]["img_size"] // high["constructor"]["patch_size"]) ** 2 == dec.num_queries
    assert high["max_tokens_per_image"] == dec.num_queries and dec.code_dim == tok.code_dim
    replaced = high["hard_coded_dims_replaced"]  # [upstream, fixture] pairs
    assert (replaced["decoder_out_dim"][1], replaced["unet_proj_1.out"][1], replaced["unet_proj_2.out"][1]) == (
        dec.out_dim, dec.unet_proj_1_dim, dec.unet_proj_2_dim)
    pool = replaced["unet_attnpool"]
    assert (pool["seq_len"], pool["embed_dim"], pool["num_heads"], pool["output_dim"]) == (
        dec.num_queries, dec.out_dim, dec.num_heads, dec.pooled_dim)
    assert low["hard_coded_dims_replaced"]["unet_proj.out"][1] == dec.lowres_unet_proj_dim


# --------------------------------------------------------------------------------------------------
# 0. preprocessing
def test_preprocess(golden_dir: Path, gconfig: dict, cfg: LaVITConfig, encoder_io) -> None:
    io = _io(golden_dir, "preprocess")
    _check_io_shapes(gconfig, "preprocess", io)
    meta = gconfig["fixtures"]["preprocess"]
    # The library's CLIP constants (the processor's defaults) are the fixture's.
    assert tuple(meta["mean"]) == LaVITConfig().image_mean and tuple(meta["std"]) == LaVITConfig().image_std
    assert meta["constructor"]["image_size"] == cfg.image_size
    proc = LaVITImageProcessor(meta["constructor"]["image_size"])
    n_images = io["resized_uint8"].shape[0]
    names = [f"raw_image_{i}" for i in range(n_images)]
    assert set(io) == {*names, "resized_uint8"}, f"preprocess io tensors {sorted(io)}"
    raws = [io[name].numpy() for name in names]
    resized = torch.stack([torch.from_numpy(proc.resize(r)) for r in raws])
    _exact(resized, io["resized_uint8"], "preprocess.resized_uint8")
    pixel_values = proc(raws)
    _close(pixel_values, encoder_io["pixel_values"], _tol(gconfig, "preprocess"), "preprocess -> pixel_values")


# --------------------------------------------------------------------------------------------------
# 1. EVA visual encoder
def test_visual_encoder(golden_dir: Path, gconfig: dict, cfg: LaVITConfig, encoder_io) -> None:
    _check_io_shapes(gconfig, "visual_encoder", encoder_io)
    eva = EVAVisionTransformer(cfg.tokenizer.encoder)
    state = load_file(str(golden_dir / "visual_encoder.weights.safetensors"))
    assert len(state) == gconfig["fixtures"]["visual_encoder"]["weights"]["n_tensors"] == len(eva.state_dict())
    _load_strict(eva, state, "EVAVisionTransformer")
    tol = _tol(gconfig, "visual_encoder")
    scale = _probe_scale(gconfig, "visual_encoder", "features_all_tokens_eps_probe")
    x = encoder_io["pixel_values"]
    with torch.no_grad():
        emb = eva.embed(x)
        _close(emb, encoder_io["embeddings"], tol, "visual_encoder.embeddings")
        _close(eva.blocks[0](emb), encoder_io["block_0_out"], tol, "visual_encoder.block_0_out")
        _close(eva.forward_features(x), encoder_io["features_all_tokens"], tol,
               "visual_encoder.features_all_tokens")
        _close(eva.patch_features(x), encoder_io["features"], tol, "visual_encoder.features")
        _close(eva(x), encoder_io["head_output"], tol, "visual_encoder.head_output")
        _close(eva.forward_features(x * scale), encoder_io["features_all_tokens_eps_probe"], tol,
               "visual_encoder.features_all_tokens_eps_probe")


def test_tokenizer_state_dict(golden_dir: Path, gconfig: dict, cfg: LaVITConfig) -> None:
    state = load_file(str(golden_dir / "dynamic_tokenizer.weights.safetensors"))
    meta = gconfig["fixtures"]["dynamic_tokenizer_state_dict"]
    tok = DynamicVisualTokenizer(cfg.tokenizer)
    assert len(state) == meta["n_tensors"] == len(tok.state_dict())
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
    tol = _tol(gconfig, "token_predictor")
    scale = _probe_scale(gconfig, "token_predictor", "pred_score_scaled")
    features = encoder_io["features"]
    with torch.no_grad():
        _close(tokenizer.token_predictor(features, io["policy"]), io["pred_score"], tol, "token_predictor.pred_score")
        _close(tokenizer.predict_keep_scores(features), io["pred_score"], tol, "predict_keep_scores")
        _close(tokenizer.token_predictor(features * scale, io["policy"]), io["pred_score_scaled"], tol,
               "token_predictor.pred_score_scaled")


# --------------------------------------------------------------------------------------------------
# 3. token merger + quantizer
def test_token_merger_quantizer(golden_dir: Path, gconfig: dict, cfg: LaVITConfig, tokenizer, encoder_io) -> None:
    io = _io(golden_dir, "token_merger_quantizer")
    _check_io_shapes(gconfig, "token_merger_quantizer", io)
    tol = _tol(gconfig, "token_merger_quantizer")
    scale = _probe_scale(gconfig, "token_merger_quantizer", "merged_features_scaled")
    features, keep = encoder_io["features"], io["keep_decision"]
    with torch.no_grad():
        merged = tokenizer.causal_encoder(features, keep)
        _close(merged, io["merged_features"], tol, "merged_features")
        _close(tokenizer.causal_encoder(features, io["keep_decision_edge"]), io["merged_features_edge"], tol,
               "merged_features_edge (an image that keeps nothing)")
        _close(tokenizer.causal_encoder(features * scale, keep), io["merged_features_scaled"], tol,
               "merged_features_scaled")
        kept = merged[keep.bool()]
        _close(kept, io["kept_features"], tol, "kept_features")
        task = tokenizer.task_features(io["kept_features"])
        _close(task, io["task_features"], tol, "task_features")
        _close(torch.nn.functional.normalize(task, dim=-1), io["task_features_l2norm"], tol, "task_features_l2norm")
        quantized, codes = tokenizer.quantize.tokenize(io["task_features"])
        _exact(codes, io["code_ids"], "quantize.tokenize(task_features) codes")
        _close(quantized, io["quantized"], tol, "quantized")

        # The real entry points, from features and from pixels, with the fixed decision.
        for out, src in ((tokenizer.tokenize_features(features, keep), "features"),
                         (tokenizer.tokenize(encoder_io["pixel_values"], keep), "pixel_values")):
            _exact(out.token_nums, io["token_nums"], f"tokenize({src}).token_nums")
            assert [len(c) for c in out.code_ids] == io["token_nums"].tolist()
            _exact(torch.cat(out.code_ids), io["code_ids"], f"tokenize({src}).code_ids")
            _close(out.quantized, io["quantized"], tol, f"tokenize({src}).quantized")
            _exact(torch.cat(out.llm_ids(cfg.ids)), io["visual_token_ids"], f"tokenize({src}) llm ids")
            _exact(torch.cat(out.llm_ids(cfg.ids, add_special=True)), io["visual_token_ids_with_special"],
                   f"tokenize({src}) llm ids with 32000/32001")
            for b, idx in enumerate(out.patch_indices):
                _exact(idx, keep[b].nonzero().flatten(), f"tokenize({src}).patch_indices[{b}]")
            _exact(out.keep, keep, f"tokenize({src}).keep")

        understanding = tokenizer.encode_features(encoder_io["pixel_values"], keep)
        assert [u.shape[0] for u in understanding] == io["token_nums"].tolist()
        _close(torch.cat(understanding), io["understanding_features"], tol, "understanding_features")

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
    batch, n_patches = features.shape[:2]
    with pytest.raises(ValueError, match=rf"shape \[B, N\] = \[{batch}, {n_patches}\]"):
        tokenizer.tokenize_features(features, torch.ones(batch, n_patches - 1))
    with pytest.raises(ValueError, match="only 0/1"):
        tokenizer.tokenize_features(features, torch.full((batch, n_patches), 0.5))

    with torch.no_grad():
        a = tokenizer.tokenize_features(features, generator=torch.Generator().manual_seed(7))
        b = tokenizer.tokenize_features(features, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.keep, b.keep) and all(torch.equal(x, y) for x, y in zip(a.code_ids, b.code_ids))
    assert a.token_nums.tolist() == [len(c) for c in a.code_ids] == [len(p) for p in a.patch_indices]

    # Hard Gumbel sampling keeps patch i with probability exp(pred_score[..., 0]).
    pred = _io(golden_dir, "token_predictor")["pred_score"]
    n = 4000
    assert pred.shape[:2] == (batch, n_patches)
    draws = sample_keep_decision(pred.expand(n, *pred.shape).reshape(n * batch, *pred.shape[1:]),
                                 torch.Generator().manual_seed(0)).reshape(n, batch, n_patches)
    p_keep = pred[..., 0].exp()
    sigma = (p_keep * (1 - p_keep) / n).sqrt()
    dev = (draws.mean(0) - p_keep).abs()
    assert bool((dev <= 5 * sigma + 1e-3).all()), f"sampled keep rate deviates by up to {dev.max():.4f}"


# --------------------------------------------------------------------------------------------------
# 4. detokenizers
def test_highres_decoder(golden_dir: Path, gconfig: dict, cfg: LaVITConfig, tokenizer, highres) -> None:
    io = _io(golden_dir, "highres_decoder")
    _check_io_shapes(gconfig, "highres_decoder", io)
    assert len(highres.state_dict()) == gconfig["fixtures"]["highres_decoder"]["weights"]["n_tensors"]
    tol = _tol(gconfig, "highres_decoder")
    codes, nums = llm_ids_to_codes(io["llm_sequences"], cfg.ids)
    _exact(codes, io["code_ids"], "llm_ids_to_codes code_ids")
    _exact(nums, io["token_nums"], "llm_ids_to_codes token_nums")
    codes_l, nums_l = llm_ids_to_codes(list(io["llm_sequences"]), cfg.ids)
    _exact(codes_l, io["code_ids"], "llm_ids_to_codes(list) code_ids")
    _exact(nums_l, io["token_nums"], "llm_ids_to_codes(list) token_nums")
    with torch.no_grad():
        rows = tokenizer.quantize(codes)
        _close(rows, io["codebook_rows"], tol, "codebook_rows")
        _close(highres.decode_queries(io["codebook_rows"], io["token_nums"]), io["visual_rec"], tol, "visual_rec")
        prompt, pooled = highres(io["codebook_rows"], io["token_nums"])
    _close(prompt, io["prompt_embeds"], tol, "prompt_embeds")
    _close(pooled, io["pooled_prompt_embeds"], tol, "pooled_prompt_embeds")


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
    _close(out, io["prompt_embeds"], _tol(gconfig, "lowres_decoder"), "lowres prompt_embeds")


def test_decoder_input_errors(highres, cfg: LaVITConfig) -> None:
    rows = torch.zeros(3, cfg.decoder.code_dim)
    with pytest.raises(ValueError, match=r"sum\(token_nums\) = 4"):
        highres(rows, torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="at least one visual token"):
        highres(rows[:0], torch.tensor([0, 0]))
    too_many = cfg.decoder.num_queries + 1
    with pytest.raises(ValueError, match=f"{too_many} visual tokens"):
        highres(torch.zeros(too_many, cfg.decoder.code_dim), torch.tensor([too_many]))
