"""Benchmark: a full toy Stage-1 SFT run and what it buys (not a test).

Trains Stage 1 on toy-poster with the toy defaults (:meth:`pigeon_utils.sft.SFTConfig.for_preset`), then generates
one image per test sample at a fixed reference mask ratio α_r with (a) the pre-trained toy LMM (LoRA = identity,
fresh adapter — the starting point of SFT) and (b) the SFT model, from the same prompts, masks and seeds, with the
sweep's decoder (:func:`pigeon_utils.generation.generate_images`; beam-sample unless ``--num-beams 1``), and scores
both with the toy CLIP's zero-shot factor classifier:

* style accuracy w.r.t. the user's history — a generated image's colour / pattern / stroke is right when it is a
  most frequent value among the sample's five history images;
* semantic accuracy w.r.t. the reference — its glyph equals the reference (= target) image's glyph.

It prints both, the validation losses (pre-trained = step 0, SFT = best) and the wall time, and writes them to
``<run_dir>/sft/bench_sft.json``.

    .venv/bin/python bench/bench_sft.py [--run-dir runs/bench-sft] [--alpha-r 0.5] [--test-samples 207]
                                        [--max-steps N] [--scenario movie] [--sft-seed 123]
                                        [--adapter-only-steps 300] [--num-beams 4]

Several ``--sft-seed`` runs (each in its own ``--run-dir``) give the spread that ``bench/bench_sweep.py --sft A B
…`` averages the α_r trade-off over.
"""
from __future__ import annotations

import argparse
import json
import time

import pigeon_utils  # noqa: F401
from pigeon_utils import config
from pigeon_utils.data import open_dataset
from pigeon_utils.generation import SamplingConfig
from pigeon_utils.sft import SFTConfig, pretrained_model, train_sft
from pigeon_utils.toy.scoring import compare_generation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/bench-sft")
    ap.add_argument("--scenario", default="movie", choices=["movie", "sticker"])
    ap.add_argument("--alpha-r", type=float, default=0.5, help="reference mask ratio α_r for generation")
    ap.add_argument("--test-samples", type=int, default=None, help="test samples to generate for (default all)")
    ap.add_argument("--max-steps", type=int, default=None, help="override the toy default")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="validation every N steps (default: the toy preset's, 100; the figures of 2026-11-25 used 50)")
    ap.add_argument("--seed", type=int, default=0, help="generation seed")
    ap.add_argument("--sft-seed", type=int, default=None,
                    help="SFT seed (initialisation, data order, masks; default: the toy preset's, 123)")
    ap.add_argument("--adapter-only-steps", type=int, default=None,
                    help="steps in which the adapter learns alone (default: the toy preset's, 300; 0: the reference)")
    ap.add_argument("--num-beams", type=int, default=None,
                    help="decoder for the looks: 4 = the reference's beam-sample (the default), 1 = plain sampling")
    args = ap.parse_args()

    run = config.resolve(preset="toy", scenario=args.scenario, run_dir=args.run_dir, device="cpu")
    overrides = {k: v for k, v in (("max_steps", args.max_steps), ("seed", args.sft_seed),
                                   ("adapter_only_steps", args.adapter_only_steps),
                                   ("eval_every", args.eval_every)) if v is not None}
    cfg = SFTConfig.for_preset("toy", **overrides)
    t0 = time.perf_counter()
    res = train_sft(cfg, run, resume=False)
    train_s = time.perf_counter() - t0

    from pigeon_utils.toy.load import load_toy_clip

    ds = open_dataset(run.data_dir, run.scenario)
    samples = ds.samples("test")[: args.test_samples]
    clip = load_toy_clip(run.checkpoint_dir, res.model.backbone.text_tokenizer)
    models = {"pre-trained": pretrained_model(run, cfg), "SFT": res.model}
    t1 = time.perf_counter()
    sampling = SamplingConfig.for_preset("toy", num_beams=args.num_beams)
    cmp = compare_generation(models, ds, samples, args.alpha_r, clip, sampling, seed=args.seed, progress=True)
    gen_s = time.perf_counter() - t1
    valid = res.log["valid"]
    report = {
        "scenario": args.scenario, "sft_seed": cfg.seed, "alpha_r": args.alpha_r, "test_samples": len(samples),
        "steps": res.steps, "stopped_early": res.stopped_early, "train_seconds": round(train_s, 1),
        "generate_seconds": round(gen_s, 1),
        "valid_loss": {"pre-trained": valid[0]["loss"], "SFT": min(v["loss"] for v in valid)},
        **{name: {**r["scores"], "tokens_per_image": r["tokens_per_image"]} for name, r in cmp.items()},
    }
    print(json.dumps(report, indent=1))
    pre, sft = report["pre-trained"], report["SFT"]
    print(f"\nstyle accuracy vs history: pre-trained {pre['style']:.1%} -> SFT {sft['style']:.1%}; "
          f"semantic accuracy vs reference: {pre['semantic']:.1%} -> {sft['semantic']:.1%}; "
          f"valid loss {report['valid_loss']['pre-trained']:.3f} -> {report['valid_loss']['SFT']:.3f}; "
          f"training {train_s / 60:.1f} min")
    (res.out_dir / "bench_sft.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
