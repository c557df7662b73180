"""Notebook 08's playground driven from code: dataset picks, uploads, α_r / α_h / model changes, what it shows.

Toy world, smoke sizes: two ratios, plain sampling of at most 8 tokens, 2 decoder steps.
"""
from __future__ import annotations

import datetime
import io

import numpy as np
import pytest
import torch
from PIL import Image

import pigeon_utils.generation as generation
from pigeon_utils import config
from pigeon_utils.data import open_dataset
from pigeon_utils.generate import PRETRAINED, ModelBank
from pigeon_utils.scoring import optional_clip
from pigeon_utils.playground import Playground
from pigeon_utils.worlds import load_backbone

STAGE1 = "Stage 1 (SFT)"


def _stage1(run) -> None:
    """A Stage-1 model folder (a LoRA that is not the identity, another adapter) at run_dir/sft/best."""
    from pigeon_utils.model import PigeonModel
    from pigeon_utils.sft import SFTConfig

    torch.manual_seed(1)
    model = PigeonModel(load_backbone("toy", run.checkpoint_dir), SFTConfig.for_preset("toy").model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name.startswith("adapter."):
                p.normal_(0.0, 0.1)
    model.save_pretrained(run.run_dir / "sft" / "best")


@pytest.fixture(scope="module")
def pg(tmp_path_factory) -> Playground:
    run = config.resolve("toy", "sticker", tmp_path_factory.mktemp("run"), device="cpu")
    _stage1(run)
    backbone = load_backbone("toy", run.checkpoint_dir)
    bank = ModelBank(run, backbone)
    clip, why = optional_clip(run, backbone.text_tokenizer, device=backbone.lmm.device)
    assert clip is not None, why
    sampling = generation.SamplingConfig.for_preset("toy", num_beams=1, max_new_tokens=8)
    return Playground(bank, open_dataset(run.data_dir, "sticker"), clip=clip, n_samples=3, ratios=[0.0, 1.0],
                      ref_mask_ratio=0.0, sampling=sampling, decode_kw={"num_inference_steps": 2}, seed=0)


@pytest.fixture
def prefills(monkeypatch) -> list:
    """Counts the prompt prefills (generate_tokens reads the prompt prefix there)."""
    calls = []
    real = generation.prefill

    def counting(*a, **kw):
        calls.append(kw.get("reserve"))
        return real(*a, **kw)

    monkeypatch.setattr(generation, "prefill", counting)
    return calls


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _upload(name: str, data: bytes) -> dict:
    return {"name": name, "type": "image/png", "size": len(data), "content": memoryview(data),
            "last_modified": datetime.datetime(2024, 1, 1)}


def test_dataset_pick_and_alpha_r_reuse_the_sweep(pg, prefills):
    pg.set(model=PRETRAINED, sample=1, ref_mask_ratio=0.0)
    s = pg.samples[1]
    assert [src.split(":")[0] for src in pg.sources] == [str(i) for i in s.iids]
    assert pg.text.value == pg.ds.semantics[s.target] and pg.info.value == pg.ds.target_info(s.target)
    assert len(pg.history) == 5 and pg.reference.mode == "RGB"
    first, first_png, first_scores = pg.image.copy(), pg.image_png, dict(pg.scores)
    assert first.dtype == np.uint8 and first.ndim == 3 and first.shape[2] == 3
    assert all(np.isfinite(v) for v in first_scores.values()), first_scores
    n = len(prefills)
    pg.ref_ratio.value = 1.0  # the slider, as a person moves it
    assert len(prefills) == n, "moving α_r ran the prompt prefill again"
    assert not np.array_equal(pg.image, first) and pg.image_png != first_png, "the image did not change with α_r"
    assert pg.scores != first_scores and set(pg.scores) == {"history_cis", "reference_cs"}
    assert "α_r = 1.00" in pg.scores_html.value and "history CIS" in pg.scores_html.value
    pg.set(ref_mask_ratio=0.0)
    assert np.array_equal(pg.image, first) and len(prefills) == n
    assert pg.strip_png and pg.sweep_image().width > 2 * pg.image.shape[1]
    assert "0.00" in pg.table() and "1.00" in pg.table()


def test_alpha_h_and_inputs_make_a_new_sweep_once(pg, prefills):
    pg.set(model=PRETRAINED, sample=0)
    n = len(prefills)
    pg.set(hist_mask_ratio=0.6)
    assert len(prefills) == n + 1 and pg.sweep["hist_mask_ratio"] == 0.6
    pg.set(text="a sticker showing joy")
    assert len(prefills) == n + 2, "one new input, one sweep"
    pg.set(sample=0, hist_mask_ratio=0.2)  # back to settings seen before: taken from what is kept
    assert pg.text.value == pg.ds.semantics[pg.samples[0].target]


def test_upload_png_bytes_through_the_widget(pg, prefills):
    pg.set(model=PRETRAINED, sample=0)
    n = len(prefills)
    odd = Image.new("RGBA", (90, 50), (200, 30, 30, 255))
    odd.paste((0, 0, 0, 0), (0, 0, 45, 50))  # half transparent
    pg.history_upload.value = (_upload("b.png", _png(odd)), _upload("a.png", _png(odd.convert("L"))))
    assert pg.sources[0].endswith("a.png") and pg.sources[1].endswith("b.png"), pg.sources
    assert pg.history[0].mode == "RGB" and pg.history[1].size == (90, 50)
    assert pg.history[1].getpixel((10, 10)) == (255, 255, 255), "transparency should lie over white"
    assert pg.sources[2:5] == [f"{i}: {pg.ds.target_info(i)}" for i in pg.samples[0].history[2:]]
    assert len(prefills) == n + 1 and pg.status.value == ""
    assert pg.history_upload.value == (), "an upload is taken, so the same file can come again"
    pg.reference_upload.value = (_upload("ref.png", _png(Image.new("P", (300, 200), 3))),)
    assert pg.sources[5].endswith("ref.png") and len(prefills) == n + 2
    # a file that is no image: an error in the status line, nothing else changes
    before = (list(pg.sources), pg.image_png)
    pg.reference_upload.value = (_upload("broken.png", b"not an image"),)
    assert "broken.png" in pg.status.value and "not a readable image" in pg.status.value
    assert (pg.sources, pg.image_png) == before and len(prefills) == n + 2


def test_switch_model(pg, prefills):
    assert list(pg.bank.choices) == [PRETRAINED, STAGE1]
    pg.set(model=PRETRAINED, sample=2, ref_mask_ratio=1.0)
    pre = pg.image.copy()
    n = len(prefills)
    pg.model.value = STAGE1
    assert len(prefills) == n + 1 and pg.sweep["model"] == STAGE1 and STAGE1 in pg.scores_html.value
    assert not np.array_equal(pg.image, pre), "Stage 1 drew the pre-trained model's image"
    pg.set(model=PRETRAINED)
    assert np.array_equal(pg.image, pre) and len(prefills) == n + 1  # kept from before
    initial = pg.bank._initial
    pg.bank.use(STAGE1)
    now = pg.bank.use(PRETRAINED).trainable_state()
    for part, sd in initial.items():  # the pre-trained weights really come back
        assert all(torch.equal(now[part][k], v) for k, v in sd.items()), part


def test_set_from_code_takes_images_bytes_paths_and_checks(pg, prefills, tmp_path):
    ds = pg.ds
    path = tmp_path / "grey.png"
    ds.load_image(5).convert("L").resize((31, 77)).save(path)
    hist = [ds.load_image(1).resize((128, 128)), _png(ds.load_image(2).convert("RGBA")), path, 3, 4]
    pg.set(history=hist, reference=ds.load_image(9).convert("P"), text="a sticker showing joy", info="Joy",
           model=PRETRAINED)
    assert pg.sources[2].startswith("upload") and pg.sources[2].endswith("grey.png")
    assert pg.sources[3:5] == [f"3: {ds.target_info(3)}", f"4: {ds.target_info(4)}"]
    assert pg.image is not None and pg.scores["history_cis"] is not None
    with pytest.raises(ValueError, match="expected 5 images, got 4"):
        pg.set(history=[1, 2, 3, 4])
    with pytest.raises(ValueError, match="0.3.*expected one of"):
        pg.set(ref_mask_ratio=0.3)
    with pytest.raises(ValueError, match="model 'nope'"):
        pg.set(model="nope")
    with pytest.raises(ValueError, match="missing.png: image file not found"):
        pg.set(reference=tmp_path / "missing.png")
    with pytest.raises(ValueError, match="target text is empty"):
        pg.set(text="  ")
