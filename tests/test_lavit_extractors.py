"""Evaluation extractors: local files only. Missing weights name the path and the download; the loading code paths run
on tiny random models saved locally (open_clip, DINOv2 always; LPIPS and FID Inception where the `eval` extra is
installed)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pigeon_utils.backbone import CheckpointError
from pigeon_utils.lavit import extractors as E


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 5 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture()
def eval_dir(tmp_path: Path, monkeypatch) -> Path:
    d = tmp_path / "eval"
    d.mkdir()
    monkeypatch.setenv("PIGEON_EVAL_DIR", str(d))
    return d


# ------------------------------------------------------------------------------------------ missing files
@pytest.mark.parametrize("load, expected, source", [
    (E.load_open_clip, "open_clip/ViT-H-14-laion2b_s32b_b79k/open_clip_model.safetensors",
     "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    (E.load_dinov2, "dinov2-large/config.json", "facebook/dinov2-large"),
    (E.load_lpips_vgg, "vgg16-397923af.pth", "download.pytorch.org/models/vgg16-397923af.pth"),
    (E.load_fid_inception, "pt_inception-2015-12-05-6726825d.pth", "pytorch-fid/releases"),
])
def test_missing_weights_name_path_and_download(eval_dir: Path, load, expected: str, source: str) -> None:
    assert E.default_eval_dir() == eval_dir
    with pytest.raises(E.ExtractorWeightsError) as info:
        load()
    msg = str(info.value)
    assert str(eval_dir / expected) in msg and source in msg and "Download" in msg
    assert isinstance(info.value, CheckpointError)


def test_open_clip_folder_without_weights_lists_file_names(tmp_path: Path) -> None:
    with pytest.raises(E.ExtractorWeightsError, match="open_clip_pytorch_model.bin"):
        E.load_open_clip(tmp_path)


def test_dinov2_without_weight_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "preprocessor_config.json").write_text("{}")
    with pytest.raises(E.ExtractorWeightsError, match="model.safetensors"):
        E.load_dinov2(tmp_path)


@pytest.mark.parametrize("module, load, file", [
    ("lpips", E.load_lpips_vgg, E.VGG16_FILE),
    ("pytorch_fid.inception", E.load_fid_inception, E.INCEPTION_FILE),
])
def test_optional_package_missing_is_a_clear_error(tmp_path: Path, monkeypatch, module: str, load, file: str) -> None:
    (tmp_path / file).write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # import -> ImportError, installed or not
    with pytest.raises(ImportError, match=r"\.\[eval\]"):
        load(tmp_path / file)


# ------------------------------------------------------------------------------------------ tiny models
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_open_clip_loads_local_weights(tmp_path: Path) -> None:
    import open_clip

    cfg_file = tmp_path / "pigeon-tiny-clip.json"
    cfg_file.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(str(cfg_file))
    torch.manual_seed(0)
    ref = open_clip.create_model("pigeon-tiny-clip").eval()
    folder = tmp_path / "clip"
    folder.mkdir()
    torch.save(ref.state_dict(), folder / "open_clip_pytorch_model.bin")

    ex = E.load_open_clip(folder, model_name="pigeon-tiny-clip")
    images = _images(3)
    feats = ex.image_features(images)
    with torch.no_grad():
        want = F.normalize(ref.encode_image(torch.stack([ex.preprocess(im) for im in images])), dim=-1)
        want_t = F.normalize(ref.encode_text(open_clip.get_tokenizer("pigeon-tiny-clip")(["a cat", "a dog"])), dim=-1)
    torch.testing.assert_close(feats, want)
    torch.testing.assert_close(ex.text_features(["a cat", "a dog"]), want_t)

    state = ref.state_dict()
    state["visual.extra"] = torch.zeros(1)
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    with pytest.raises(E.ExtractorWeightsError, match="visual.extra"):
        E.load_open_clip(folder / "open_clip_pytorch_model.bin", model_name="pigeon-tiny-clip")


def test_dinov2_loads_local_folder(tmp_path: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    ref = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                   image_size=28, patch_size=14)).eval()
    ref.save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path)
    ex = E.load_dinov2(tmp_path)
    images = _images(2)
    x = ex.processor(images=images, return_tensors="pt")["pixel_values"]
    assert x.shape == (2, 3, 28, 28)
    with torch.no_grad():
        want = ref(pixel_values=x).pooler_output
    torch.testing.assert_close(ex.image_features(images), want)
    torch.testing.assert_close(ex.image_features(images, normalize=True).norm(dim=-1), torch.ones(2))

    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state[next(k for k in state if "layernorm" in k)]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(E.ExtractorWeightsError, match="layernorm"):
        E.load_dinov2(tmp_path)


@pytest.mark.slow
def test_lpips_vgg_from_local_trunk(tmp_path: Path) -> None:
    pytest.importorskip("lpips", reason="the optional eval extra (lpips) is not installed")
    import torchvision

    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])  # vgg16's trunk alone
    trunk = {f"features.{k}": v for k, v in features.state_dict().items()}
    torch.save(trunk, tmp_path / E.VGG16_FILE)
    metric = E.load_lpips_vgg(tmp_path)
    assert torch.equal(getattr(metric.model.net.slice5, "28").weight, trunk["features.28.weight"])
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    assert torch.equal(metric.distance(a, a), torch.zeros(2))
    assert bool((metric.distance(a, b) > 0).all())
    del trunk["features.28.weight"]
    torch.save(trunk, tmp_path / E.VGG16_FILE)
    with pytest.raises(E.ExtractorWeightsError, match=r"features\.28\.weight"):
        E.load_lpips_vgg(tmp_path / E.VGG16_FILE)


@pytest.mark.slow
def test_fid_inception_from_local_file(tmp_path: Path) -> None:
    inception = pytest.importorskip("pytorch_fid.inception", reason="the optional eval extra is not installed")
    original = inception.load_state_dict_from_url
    # the FID architecture as pytorch-fid builds it, with random weights
    net = inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in (("Mixed_5b", inception.FIDInceptionA(192, 32)), ("Mixed_5c", inception.FIDInceptionA(256, 64)),
                        ("Mixed_5d", inception.FIDInceptionA(288, 64)), ("Mixed_6b", inception.FIDInceptionC(768, 128)),
                        ("Mixed_6c", inception.FIDInceptionC(768, 160)),
                        ("Mixed_6d", inception.FIDInceptionC(768, 160)),
                        ("Mixed_6e", inception.FIDInceptionC(768, 192)), ("Mixed_7b", inception.FIDInceptionE_1(1280)),
                        ("Mixed_7c", inception.FIDInceptionE_2(2048))):
        setattr(net, name, block)
    torch.save(net.state_dict(), tmp_path / E.INCEPTION_FILE)
    feats = E.load_fid_inception(tmp_path).features(torch.rand(1, 3, 32, 32))
    assert feats.shape == (1, 2048) and bool(torch.isfinite(feats).all())
    assert inception.load_state_dict_from_url is original  # the local-file patch is undone
