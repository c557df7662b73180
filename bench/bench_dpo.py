"""Benchmark: what Stage 2 (DPO) buys on the toy, over several DPO seeds, and what caching the reference costs
(not a test).

Needs a run directory with a Stage-1 model (``sft/best``, notebook 03 or ``bench/bench_sft.py``) and preference pairs
(``preference/{train,valid}/pairs.json``, notebook 04). For each ``--seeds`` value it trains Stage 2 with the toy
defaults (:meth:`pigeon_utils.dpo.DPOConfig.for_preset`; seed = that value) into ``<run_dir>/bench-dpo/seed-<S>/``,
then sweeps ``--samples`` held-out **test** samples over the paper's α_r with the Stage-1 and the Stage-2 model (same
prompts, masks and sampling seeds; the Stage-1 sweep once) and scores every image with the toy CLIP. Printed per
seed and as the mean ± standard error over the seeds:

* the per-sample paired difference Stage 2 − Stage 1 in history CIS and reference CS (mean over the α_r; mean ± SE
  over the samples);
* the reward accuracy and the DPO loss on the held-out validation pairs at the best validation step.

Then, side by side in one process, the seconds of a DPO training step (forward, backward, optimiser) with the
reference log-probs cached (read from the table) and recomputed (a frozen Stage-1 reference pass every step), over
``--timing-steps`` batches (the fastest of ``--repeats`` passes counts). Everything goes to
``<run_dir>/bench-dpo/bench_dpo.json``.

    .venv/bin/python bench/bench_dpo.py --run-dir runs/bench-sft-sticker [--seeds 123 1 2] [--samples 48]
                                        [--max-steps N] [--timing-steps 10] [--repeats 3] [--scenario sticker]
"""
from __future__ import annotations

import argparse
import json
import time

import pigeon_utils  # noqa: F401
import torch

from pigeon_utils import config
from pigeon_utils.checkpoints import load_pigeon_model
from pigeon_utils.data import open_dataset
from pigeon_utils.dpo import DPOConfig, dpo_stage, reference_cache, train_dpo
from pigeon_utils.preference import PreferenceSet
from pigeon_utils.scoring import load_clip, mean_se, paired_difference, sweep_and_score
from pigeon_utils.sweep import PAPER_REF_MASK_RATIOS, InferenceConfig
from pigeon_utils.worlds import load_backbone


def time_steps(cfg: DPOConfig, run, pairs: dict, sft_dir, out_dir, steps: int, cached: bool) -> float:
    """Seconds per DPO training step over `steps` batches, with the reference cached or recomputed."""
    cfg = DPOConfig(**{**cfg.to_dict(), "precompute_ref_log_probs": cached})
    stage, acc = dpo_stage(cfg, run, pairs["train"], pairs["valid"], sft_dir=sft_dir)
    if cached:
        stage.reference = reference_cache(stage, acc, out_dir, sft_dir)
    opt = torch.optim.AdamW([p for p in stage.model.parameters() if p.requires_grad], lr=cfg.lr)
    loader = torch.utils.data.DataLoader(stage.train_set, batch_size=cfg.batch_size, shuffle=False,
                                         collate_fn=stage.train_collate)
    batches = [b for _, b in zip(range(steps), loader)]
    stage.model.train()
    t0 = time.perf_counter()
    for k, batch in enumerate(batches):
        loss_sum, n, _ = stage.loss(stage.model, batch, k, train=True)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", default="runs/bench-sft-sticker")
    ap.add_argument("--scenario", default="sticker", choices=["movie", "sticker"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[123, 1, 2], help="DPO seeds (one training run each)")
    ap.add_argument("--samples", type=int, default=48, help="held-out test samples of the comparison")
    ap.add_argument("--max-steps", type=int, default=None, help="override the toy default")
    ap.add_argument("--timing-steps", type=int, default=10, help="batches timed per arm (0: no timing)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per arm (the fastest counts)")
    args = ap.parse_args()

    run = config.resolve(preset="toy", scenario=args.scenario, run_dir=args.run_dir, device="cpu")
    sft_dir, out = run.run_dir / "sft" / "best", run.run_dir / "bench-dpo"
    psets = {s: PreferenceSet.load(run.run_dir / "preference" / s / "pairs.json") for s in ("train", "valid")}
    pairs = {s: p.training_pairs() for s, p in psets.items()}
    ds = open_dataset(run.data_dir, run.scenario)
    clip = load_clip("toy", run.checkpoint_dir)
    # the paper's eleven α_r and the toy decoder's own 20 steps, as the recorded figures were measured
    inf_cfg = InferenceConfig.for_preset("toy", seed=0, ref_mask_ratios=PAPER_REF_MASK_RATIOS, num_inference_steps=20)
    overrides = {"max_steps": args.max_steps} if args.max_steps else {}
    stage1 = load_pigeon_model(load_backbone("toy", run.checkpoint_dir), sft_dir)
    runs = []
    for seed in args.seeds:
        cfg = DPOConfig.for_preset("toy", seed=seed, **overrides)
        t0 = time.perf_counter()
        res = train_dpo(cfg, run, pairs["train"], pairs["valid"], sft_dir=sft_dir, out_dir=out / f"seed-{seed}",
                        resume=False)
        train_s = time.perf_counter() - t0
        scores = sweep_and_score({"stage1": stage1, f"stage2-seed-{seed}": res.model}, ds, "test", out / "compare",
                                 inf_cfg, clip, max_samples=args.samples)
        diff = paired_difference(scores["stage1"], scores[f"stage2-seed-{seed}"])
        best = min(res.log["valid"], key=lambda e: e["loss"])
        runs.append({"seed": seed, "steps": res.steps, "train_seconds": round(train_s, 1), "best_validation": best,
                     "difference": diff})
        o = diff["overall"]
        print(f"seed {seed}: {res.steps} steps ({train_s / 60:.1f} min); held-out pairs: reward accuracy "
              f"{best['rewards/accuracies']:.2f}, DPO loss {best['loss']:.3f} (step {best['step']}); Stage 2 − Stage 1 "
              f"on {diff['samples']} test samples: history CIS {o['history_cis']['mean']:+.2f} ± "
              f"{o['history_cis']['se']:.2f}, reference CS {o['reference_cs']['mean']:+.2f} ± "
              f"{o['reference_cs']['se']:.2f}", flush=True)
    summary = {k: mean_se([r["difference"]["overall"][k]["mean"] for r in runs]) for k in ("history_cis",
                                                                                              "reference_cs")}
    summary["reward_accuracy"] = mean_se([r["best_validation"]["rewards/accuracies"] for r in runs])
    print(f"\nover {len(runs)} DPO seeds (mean ± SE over the seeds): history CIS "
          f"{summary['history_cis']['mean']:+.2f} ± {summary['history_cis']['se']:.2f}, reference CS "
          f"{summary['reference_cs']['mean']:+.2f} ± {summary['reference_cs']['se']:.2f}, held-out reward accuracy "
          f"{summary['reward_accuracy']['mean']:.2f} ± {summary['reward_accuracy']['se']:.2f}")
    timing = None
    if args.timing_steps:
        cfg = DPOConfig.for_preset("toy", **overrides)
        arms = {"cached": [], "recomputed": []}
        for _ in range(args.repeats):
            for name in arms:
                arms[name].append(time_steps(cfg, run, pairs, sft_dir, out / "timing", args.timing_steps,
                                             name == "cached"))
        timing = {name: min(v) for name, v in arms.items()}
        print(f"DPO step (batch {cfg.batch_size} pairs, fastest of {args.repeats}): reference cached "
              f"{timing['cached']:.3f} s, recomputed {timing['recomputed']:.3f} s "
              f"(ratio {timing['cached'] / timing['recomputed']:.2f})")
    (out / "bench_dpo.json").write_text(json.dumps({"runs": runs, "summary": summary, "timing": timing,
                                                    "samples": args.samples}, indent=1))
    print("wrote", out / "bench_dpo.json")


if __name__ == "__main__":
    main()
