"""``python -m pigeon_utils generate`` on a person's own files (toy world, smoke sizes), and the image loading under it.

The folder of inputs mixes sizes, RGBA, greyscale (L), palette (P) and a JPEG whose EXIF orientation tag says it is
stored rotated; the toy's preprocessing makes each an upright 64×64 RGB image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pigeon_utils.__main__ import main
from pigeon_utils.data import open_dataset
from pigeon_utils.generate import PRETRAINED, RECORD_FILE, image_name
from pigeon_utils.images import ImageInputError, history_paths, load_image

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dataset" / "toy-sticker"
FAST = ["--ratios", "0.0", "1.0", "--max-new-tokens", "8", "--min-new-tokens", "1", "--num-beams", "1", "--steps", "2"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A folder of five history images of mixed kinds (names sort in the order written), a reference, and the
    upright original of the EXIF-rotated photo."""
    ds = open_dataset(DATA, "sticker")
    s = ds.samples("test")[0]
    ims = [ds.load_image(i) for i in s.iids]
    root = tmp_path_factory.mktemp("inputs")
    folder = root / "likes"
    folder.mkdir()
    ims[0].resize((100, 80)).save(folder / "1_wide.png")
    rgba = ims[1].convert("RGBA").resize((200, 200))
    rgba.putalpha(200)
    rgba.save(folder / "2_rgba.png")
    ims[2].convert("L").save(folder / "3_grey.png")
    ims[3].convert("P").resize((33, 47)).save(folder / "4_palette.gif")
    upright = ims[4].resize((128, 96))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the pixels are stored turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "5_photo.jpg", exif=exif.tobytes(), quality=95)
    (folder / "notes.txt").write_text("not an image: skipped")
    (folder / "6_extra.png").write_bytes((folder / "1_wide.png").read_bytes())  # a sixth: not taken
    ims[5].save(root / "ref.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    return {"folder": folder, "ref": root / "ref.png", "broken": root / "broken.png", "upright": upright,
            "files": sorted(p for p in folder.iterdir() if p.suffix != ".txt")[:5], "text": ds.semantics[s.target],
            "info": ds.target_info(s.target)}


def _args(inputs, out: Path, *extra: str, history=None) -> list[str]:
    hist = [str(p) for p in (history if history is not None else [inputs["folder"]])]
    return ["generate", "--history", *hist, "--reference", str(inputs["ref"]), "--text", inputs["text"],
            "--info", inputs["info"], "--out", str(out), *FAST, *extra]


def test_images_of_any_kind_become_upright_rgb(inputs):
    files = history_paths([inputs["folder"]])
    assert [p.name for p in files] == ["1_wide.png", "2_rgba.png", "3_grey.png", "4_palette.gif", "5_photo.jpg"]
    ims = [load_image(p) for p in files]
    assert all(im.mode == "RGB" for im in ims)
    photo = np.asarray(ims[4], dtype=float)
    assert ims[4].size == (128, 96), "the EXIF orientation was not applied"
    assert np.abs(photo - np.asarray(inputs["upright"], dtype=float)).mean() < 8
    from pigeon_utils.toy.tokenizer import ToyVisualTokenizer

    tok = ToyVisualTokenizer.from_pretrained(REPO / "checkpoints" / "toy" / "visual_tokenizer")
    raw = [Image.open(p) for p in files]  # as opened: modes RGB, RGBA, L, P, and a rotated JPEG
    toks = tok.tokenize(raw)
    assert len(toks.codes) == 5 and all(len(c) >= 1 for c in toks.codes)
    assert [c.tolist() for c in tok.tokenize(ims).codes] == [c.tolist() for c in toks.codes]


def test_generate_writes_pngs_and_record_and_is_seeded(inputs, tmp_path, capsys):
    empty_run = tmp_path / "run-without-model"
    empty_run.mkdir()
    out = tmp_path / "out"
    assert main(_args(inputs, out, "--run-dir", str(empty_run), "--seed", "7")) == 0
    assert "model: pre-trained (no Stage 1)" in capsys.readouterr().out
    rec = json.loads((out / RECORD_FILE).read_text())
    assert sorted(p.name for p in out.iterdir()) == [image_name(0.0), image_name(1.0), RECORD_FILE]
    for im in rec["images"]:
        png = Image.open(out / im["path"])
        assert png.format == "PNG" and png.size == (64, 64) and png.mode == "RGB"
        assert im["codes"] and all(isinstance(c, int) for c in im["codes"])
        assert np.isfinite(im["history_cis"]) and np.isfinite(im["reference_cs"])
    assert [im["ref_mask_ratio"] for im in rec["images"]] == [0.0, 1.0]
    assert rec["model"] == {"label": PRETRAINED, "folder": None, "run_dir": str(empty_run)}
    assert rec["seed"] == 7 and rec["settings"]["sampling"]["num_beams"] == 1
    assert rec["settings"]["num_inference_steps"] == 2 and rec["clip"] == "toy CLIP"
    assert rec["inputs"]["history"] == [str(p.resolve()) for p in inputs["files"]]
    assert rec["inputs"]["text"] == inputs["text"] and rec["inputs"]["reference"] == str(inputs["ref"].resolve())
    # the same seed, the five files named one by one: the same images and tokens
    again = tmp_path / "again"
    assert main(_args(inputs, again, "--run-dir", str(empty_run), "--seed", "7", history=inputs["files"])) == 0
    rec2 = json.loads((again / RECORD_FILE).read_text())
    assert [im["codes"] for im in rec2["images"]] == [im["codes"] for im in rec["images"]]
    for im in rec["images"]:
        assert (again / im["path"]).read_bytes() == (out / im["path"]).read_bytes()


def test_an_interrupted_write_leaves_the_old_folder(inputs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / RECORD_FILE).write_text('{"old": true}')  # what an earlier run wrote
    real_save = Image.Image.save
    calls = []

    def failing_save(self, fp, *a, **kw):
        calls.append(fp)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        main(_args(inputs, out, "--run-dir", str(tmp_path)))
    assert [p.name for p in out.iterdir()] == [RECORD_FILE] and (out / RECORD_FILE).read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "a temporary folder was left behind"


@pytest.mark.parametrize("case", ["four", "six", "missing", "unreadable", "out_is_a_file", "out_not_ours",
                                  "run_dir_missing", "folder_of_four"])
def test_bad_input_is_a_clear_error_and_writes_nothing(inputs, tmp_path, capsys, case):
    files = inputs["files"]
    out = tmp_path / "out"
    history, extra = files, []
    expect = {"four": "expected exactly 5 images (or one folder), got 4",
              "six": "expected exactly 5 images (or one folder), got 6",
              "missing": f"{tmp_path / 'nope.png'}: image file not found",
              "unreadable": f"{inputs['broken']}: not a readable image",
              "out_is_a_file": f"--out {out}: is an existing file",
              "out_not_ours": f"--out {out}: a folder that is not empty and holds no record.json",
              "run_dir_missing": f"--run-dir {tmp_path / 'no-run'}: not a folder",
              "folder_of_four": "holds 4 image file(s)"}[case]
    if case == "four":
        history = files[:4]
    elif case == "six":
        history = [*files, inputs["ref"]]
    elif case == "missing":
        history = [*files[:4], tmp_path / "nope.png"]
    elif case == "unreadable":
        history = [*files[:4], inputs["broken"]]
    elif case == "out_is_a_file":
        out.write_text("mine")
    elif case == "out_not_ours":
        out.mkdir()
        (out / "thesis.tex").write_text("mine")
    elif case == "run_dir_missing":
        extra = ["--run-dir", str(tmp_path / "no-run")]
    elif case == "folder_of_four":
        four = tmp_path / "four"
        four.mkdir()
        for p in files[:4]:
            (four / p.name).write_bytes(p.read_bytes())
        history = [four]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(_args(inputs, out, *extra, history=history)) == 2
    err = capsys.readouterr().err
    assert err.startswith("generate failed: ") and expect in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "something was written"
    if case == "out_is_a_file":
        assert out.read_text() == "mine"


def test_history_paths_rejects_a_folder_among_files(inputs):
    with pytest.raises(ImageInputError, match="a folder must be given alone"):
        history_paths([inputs["folder"], *inputs["files"][:4]])


@pytest.mark.slow
def test_generate_runs_on_the_lavit_world(inputs, tmp_path):
    """The same files through LaVIT's own preprocessing (its image processor), on the tiny checkpoint."""
    from pigeon_utils.lavit.tiny_checkpoint import write_tiny_checkpoint

    tiny = write_tiny_checkpoint(tmp_path / "lavit-tiny", seed=0)
    out = tmp_path / "out"
    assert main(_args(inputs, out, "--preset", "lavit", "--checkpoint-dir", str(tiny), "--device", "cpu",
                      "--clip-preset", "toy", "--run-dir", str(tmp_path))) == 0
    rec = json.loads((out / RECORD_FILE).read_text())
    assert rec["settings"]["preset"] == "lavit" and rec["model"]["label"] == PRETRAINED
    assert rec["clip"] == "toy CLIP" and all(np.isfinite(im["history_cis"]) for im in rec["images"])
    for im in rec["images"]:
        assert Image.open(out / im["path"]).mode == "RGB" and im["codes"]
