"""Command line: ``python -m pigeon_utils {batch,toy-data,convert,generate} ...`` (also installed as ``pigeon``)."""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pigeon_utils", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser("batch", help="execute the notebooks in order with papermill")
    b.add_argument("--preset", default="toy", choices=["toy", "lavit"])
    b.add_argument("--scenario", default="sticker", choices=["sticker", "movie"])
    b.add_argument("--run-dir", default=None, help="default: runs/<preset>-<scenario>")
    b.add_argument("--only", nargs="*", default=None, help="notebook numbers to run, e.g. 01 02")
    b.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="extra notebook parameter (Python literal), e.g. -p max_samples 8")
    b.add_argument("--log-output", action="store_true", help="stream the notebooks' output")

    t = sub.add_parser("toy-data", help="(re)build the toy datasets")
    t.add_argument("--out", type=Path, default=Path("dataset"))
    t.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("convert", help="convert an upstream processed_seq folder (.npy pickles) to the safe format")
    c.add_argument("data_path", type=Path)
    c.add_argument("--out", type=Path, default=None)
    c.add_argument("--trust-pickle", action="store_true", help="required: the .npy files are pickles")

    g = sub.add_parser("generate", help="personalized images from your own files: one PNG per α_r + record.json")
    g.add_argument("--history", nargs="+", required=True, metavar="IMG",
                   help="five history images, or one folder (its first five images in name order)")
    g.add_argument("--reference", required=True, metavar="IMG", help="the reference image")
    g.add_argument("--text", required=True, help="the target's description, e.g. 'a sticker showing joy'")
    g.add_argument("--info", default=None, help="the target's emotion (sticker) or title (movie); default: --text")
    g.add_argument("--out", type=Path, required=True, help="output folder (written whole, atomically)")
    g.add_argument("--ratios", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="the α_r values")
    g.add_argument("--hist-mask-ratio", type=float, default=None, help="α_h (default: the model's, 0.2)")
    where = g.add_mutually_exclusive_group()
    where.add_argument("--run-dir", default=None, help="use its newest model (default runs/<preset>-<scenario>; "
                                                       "none there: the pre-trained model)")
    where.add_argument("--model", default=None, help="a model folder (ours, or the authors' checkpoint-N/)")
    g.add_argument("--stage1-dir", default=None, help="with an authors' Stage-2 --model: their Stage-1 folder")
    g.add_argument("--preset", default="toy", choices=["toy", "lavit"])
    g.add_argument("--scenario", default="sticker", choices=["sticker", "movie"])
    g.add_argument("--checkpoint-dir", default=None, help="default: the preset's")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    g.add_argument("--num-beams", type=int, default=None, help="default 4 (beam-sample); 1: plain sampling")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--min-new-tokens", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, dest="num_inference_steps", help="pixel decoder steps")
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--clip-preset", default=None, choices=["toy", "lavit"], help="score with this world's CLIP")
    g.add_argument("--clip-path", default=None, help="lavit: the open_clip ViT-H-14 weights file")

    a = ap.parse_args(argv)
    if a.cmd == "batch":
        from pigeon_utils.batch import BatchError, run_batch

        try:
            outs = run_batch(a.preset, a.scenario, a.run_dir, only=a.only,
                             parameters={k: _value(v) for k, v in a.param}, log_output=a.log_output, progress=True)
        except BatchError as e:
            print(f"batch failed: {e}", file=sys.stderr)
            return 1
        print("executed:\n" + "\n".join(f"  {p}" for p in outs))
        if any(p.name.startswith("07") for p in outs):
            from pigeon_utils.report import summary_text

            print("\n" + summary_text(outs[0].parent.parent))
    elif a.cmd == "toy-data":
        from pigeon_utils.toy import data as toy_data

        toy_data.main(["--out", str(a.out), "--seed", str(a.seed)])
    elif a.cmd == "convert":
        from pigeon_utils.data_formats import convert_upstream

        for p in convert_upstream(a.data_path, a.out, trust_pickle=a.trust_pickle):
            print(f"wrote {p}")
    elif a.cmd == "generate":
        from pigeon_utils.generate import run_generate

        kw = {k: v for k, v in vars(a).items() if k != "cmd"}
        try:
            rec = run_generate(kw.pop("history"), kw.pop("reference"), kw.pop("text"), kw.pop("out"), **kw)
        except (ValueError, FileNotFoundError) as e:
            print(f"generate failed: {e}", file=sys.stderr)
            return 2
        print(f"model: {rec['model']['label']}; wrote {len(rec['images'])} images and record.json to {a.out}")
        for im in rec["images"]:
            scores = ("" if im["history_cis"] is None else
                      f"  history CIS {im['history_cis']:.1f}  reference CS {im['reference_cs']:.1f}")
            print(f"  α_r {im['ref_mask_ratio']:.2f}: {im['path']} ({len(im['codes'])} visual tokens){scores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
