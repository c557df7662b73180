"""Benchmark: the α_r sweep's speed at several batch sizes, and that its images do not change (not a test).

`run_sweep` with the world's sweep settings (toy: α_r ∈ {0, 0.2, …, 1}, 10 decoder steps, beam-sample) over the same
validation samples, once per ``--batch-sizes`` entry and repeated ``--repeats`` times in turn (the fastest repeat of
each counts; the machine is shared). Printed per batch size: the seconds (token stage, decoding, total) and whether
every PNG and every visual-token list equals the first batch size's. A sample's mask noise, sampling seeds and decoder
noise come from its own index (docs/algorithm.md §5), so only the speed may differ.

    .venv/bin/python bench/bench_sweep_batch.py --run-dir runs/toy-demo [--samples 64] [--batch-sizes 4 8 16]
                                                [--repeats 2] [--out runs/bench-sweep-batch]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pigeon_utils  # noqa: F401

from pigeon_utils import config
from pigeon_utils.checkpoints import stage1_model
from pigeon_utils.data import open_dataset
from pigeon_utils.sweep import InferenceConfig, run_sweep
from pigeon_utils.toy.io import sha256
from pigeon_utils.worlds import load_backbone


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*.png"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run-dir", required=True, help="a run directory with a Stage-1 model (sft/best)")
    ap.add_argument("--preset", default="toy")
    ap.add_argument("--scenario", default="sticker", choices=["sticker", "movie"])
    ap.add_argument("--samples", type=int, default=64, help="validation samples")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="runs/bench-sweep-batch")
    a = ap.parse_args()

    run = config.resolve(preset=a.preset, scenario=a.scenario, run_dir=a.run_dir, device="cpu")
    backbone = load_backbone(run.preset, run.checkpoint_dir, device="cpu")
    ds = open_dataset(run.data_dir, run.scenario)
    model, folder = stage1_model(run, backbone)
    print(f"Stage 1 from {folder}; {a.samples} validation samples; {a.repeats} repeats, fastest counts")
    best, results = {}, {}
    for _ in range(a.repeats):
        for bs in a.batch_sizes:
            cfg = InferenceConfig.for_preset(run.preset, batch_size=bs, seed=0)
            out = Path(a.out) / f"batch-{bs}"
            t0 = time.perf_counter()
            res = run_sweep(model, ds, "valid", out, cfg, max_samples=a.samples, resume=False, progress=False)
            total = time.perf_counter() - t0
            if bs not in best or total < best[bs][0]:
                best[bs] = (total, res.token_seconds, res.decode_seconds)
            results[bs] = (res.index["samples"], digests(out))
    first = a.batch_sizes[0]
    print(f"{'batch':>6s}{'tokens s':>10s}{'decode s':>10s}{'total s':>9s}{'× batch ' + str(first):>12s}  same images")
    for bs in a.batch_sizes:
        total, tok, dec = best[bs]
        same = results[bs] == results[first]
        print(f"{bs:>6d}{tok:>10.1f}{dec:>10.1f}{total:>9.1f}{total / best[first][0]:>12.2f}  {same}")


if __name__ == "__main__":
    main()
