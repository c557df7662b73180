"""Command line: ``python -m pigeon_utils {batch,toy-data,convert} ...`` (also installed as ``pigeon``)."""
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

    a = ap.parse_args(argv)
    if a.cmd == "batch":
        from pigeon_utils.batch import BatchError, run_batch

        try:
            outs = run_batch(a.preset, a.scenario, a.run_dir, only=a.only,
                             parameters={k: _value(v) for k, v in a.param}, log_output=a.log_output)
        except BatchError as e:
            print(f"batch failed: {e}", file=sys.stderr)
            return 1
        print("executed:\n" + "\n".join(f"  {p}" for p in outs))
    elif a.cmd == "toy-data":
        from pigeon_utils.toy import data as toy_data

        toy_data.main(["--out", str(a.out), "--seed", str(a.seed)])
    elif a.cmd == "convert":
        from pigeon_utils.data_formats import convert_upstream

        for p in convert_upstream(a.data_path, a.out, trust_pickle=a.trust_pickle):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
