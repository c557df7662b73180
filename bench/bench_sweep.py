"""Benchmark: the α_r sweep in one shared-prefix pass vs eleven separate runs, and the α_r trade-off (not a test).

On the toy backbone on the CPU, for the same test samples, seed and batch size, side by side in one process:

* **sweep** — :func:`pigeon_utils.generation.generate_tokens` over all ratios at once (the prompt up to the ``<emb>``
  slot read once per sample and its KV cache kept once per sample for all the ratios' rows, one mask-generator and
  one detokenizer pass for all ratios), then the images decoded in one call per batch, as ``run_sweep`` does;
* **separate** — what the paper does (one inference run per α_r, docs/algorithm.md §5.3): for each α_r the images are tokenized
  again, the whole prompt is read for that α_r alone, and the images are decoded per batch (the same code: a
  run's beams share their sample's prefix cache too).

Both produce the same visual tokens (same per-row seeds) up to float rounding between batch shapes, which can flip a
near-tie draw: the number of identical (sample, α_r) rows is printed. The arms alternate ``--repeats`` times and the
fastest repeat of each counts (the machine is shared). Printed: seconds for the token stage (tokenization, masks,
LMM, sampling), for decoding, and both ratios sweep / separate (with the decoder of ``--num-beams``, by default the
reference's beam-sample). Then, for each decoder of ``--tradeoff-beams`` (default: the reference's beam-sample, 4
beams, and plain sampling), ``run_sweep`` writes the sweep's images and the toy CLIP scores them: mean history CIS
and reference CS per α_r (the paper's trade-off: CIS rises, CS falls as α_r grows), with the toy factors that
explain them (glyph and colour = the reference's, style = the history's), and the per-sample slopes of CIS and CS
over α_r (mean ± standard error). With several ``--sft`` folders (SFT runs that differ in their seed,
``bench/bench_sft.py --sft-seed``) the timing uses the first and the trade-off is scored for each, then averaged
over the runs (slopes: mean ± standard error over the runs). Everything goes to ``<out>/bench_sweep.json``.

    .venv/bin/python bench/bench_sweep.py [--sft runs/toy-sticker/sft/best ...] [--scenario sticker] [--samples 32]
                                          [--batch-size 4] [--num-beams 4] [--tradeoff-beams 4 1] [--repeats 3]
                                          [--checkpoint-dir checkpoints/toy] [--data-dir DIR] [--out runs/bench-sweep]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pigeon_utils  # noqa: F401
import torch

from pigeon_utils import config
from pigeon_utils.batching import ImageTokenCache, prompt_batch
from pigeon_utils.checkpoints import load_pigeon_model
from pigeon_utils.data import open_dataset
from pigeon_utils.generation import decode_images, generate_tokens
from pigeon_utils.scoring import load_clip, mean_se, score_sweep
from pigeon_utils.seeds import row_seed
from pigeon_utils.sft import SFTConfig, pretrained_model
from pigeon_utils.sweep import PAPER_REF_MASK_RATIOS, InferenceConfig, run_sweep

#: the sweep these figures were measured with: the paper's eleven α_r, the toy decoder's own 20 steps (the toy's
#: notebook defaults are lighter: worlds.World.sweep_ratios / sweep_decoder_steps)
PAPER_SWEEP = dict(ref_mask_ratios=PAPER_REF_MASK_RATIOS, num_inference_steps=20)
from pigeon_utils.toy.load import load_toy_clip
from pigeon_utils.toy.scoring import sweep_factor_scores
from pigeon_utils.worlds import load_backbone


def timed_pass(model, ds, samples, cfg: InferenceConfig,
               ratios_per_run: list[list[float]]) -> tuple[float, float, list]:
    """Run the given α_r groups one after the other, each as a complete run over `samples` (fresh image tokens,
    prompts, token generation, decoding). Returns (token seconds, decode seconds, codes[run][b][r])."""
    t_tok = t_dec = 0.0
    out = []
    for ratios in ratios_per_run:
        t0 = time.perf_counter()
        tokens = ImageTokenCache(ds, model.backbone.tokenizer, seed=cfg.seed)  # a separate run tokenizes again
        codes = []
        for k0 in range(0, len(samples), cfg.batch_size):
            ks = list(range(k0, min(k0 + cfg.batch_size, len(samples))))
            batch = prompt_batch(ds, [samples[k] for k in ks], ks, model.backbone, tokens, cfg.seed)
            codes += generate_tokens(model, batch.to(model.device), ratios, cfg.sampling, seed=cfg.seed)
        t_tok += time.perf_counter() - t0
        t0 = time.perf_counter()
        if len(ratios) > 1:  # the sweep: one decoder call per LMM batch (its samples' images at every α_r)
            for k0 in range(0, len(codes), cfg.batch_size):
                ks = list(range(k0, min(k0 + cfg.batch_size, len(codes))))
                decode_images(model, codes[k0:k0 + cfg.batch_size], ks, cfg.seed)
        else:  # a separate run: one decoder batch per sample batch (its one image per sample)
            for k0 in range(0, len(codes), cfg.batch_size):
                model.decode([c[0] for c in codes[k0:k0 + cfg.batch_size]],
                             generator=torch.Generator().manual_seed(row_seed(cfg.seed, k0)))
        t_dec += time.perf_counter() - t0
        out.append(codes)
    return t_tok, t_dec, out


def print_rows(per: list[dict]) -> None:
    print(f"{'α_r':>5s}{'history CIS':>13s}{'reference CS':>14s}{'glyph = ref':>13s}{'colour = ref':>14s}"
          f"{'style = history':>17s}")
    for p in per:
        f = p["factors"]
        print(f"{p['ref_mask_ratio']:>5.1f}{p['history_cis']:>13.2f}{p['reference_cs']:>14.2f}"
              f"{f['semantic']:>13.1%}{f['colour_vs_reference']:>14.1%}{f['style']:>17.1%}")


def print_slopes(slopes: dict, over: str) -> None:
    c, s = slopes["history_cis"], slopes["reference_cs"]
    print(f"slope per unit α_r, mean ± standard error {over}: history CIS {c['mean']:+.2f} ± {c['se']:.2f}, "
          f"reference CS {s['mean']:+.2f} ± {s['se']:.2f}")


def mean_over_runs(runs: list[dict]) -> dict:
    """Per α_r the mean of the runs' mean scores and factor rates; slopes: mean and standard error over the runs."""
    per = []
    for j, p in enumerate(runs[0]["per_ratio"]):
        rows = [r["per_ratio"][j] for r in runs]
        per.append({"ref_mask_ratio": p["ref_mask_ratio"],
                    **{k: float(np.mean([r[k] for r in rows])) for k in ("history_cis", "reference_cs", "score")},
                    "factors": {k: float(np.mean([r["factors"][k] for r in rows])) for k in p["factors"]}})
    slopes = {name: mean_se([r["slopes"][name]["mean"] for r in runs]) for name in ("history_cis", "reference_cs")}
    return {"per_ratio": per, "slopes": slopes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint-dir", default=None, help="toy checkpoint (default checkpoints/toy)")
    ap.add_argument("--sft", nargs="+", default=None,
                    help="Stage-1 folder(s) (run_dir/sft/best); several: the trade-off averaged over them; "
                         "default: the pre-trained model")
    ap.add_argument("--scenario", default="movie", choices=["movie", "sticker"])
    ap.add_argument("--samples", type=int, default=32, help="test samples")
    ap.add_argument("--batch-size", type=int, default=4, help="samples per LMM batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-beams", type=int, default=4, help="decoder of the timing: 4: the reference's "
                                                             "beam-sample (default); 1: plain sampling")
    ap.add_argument("--tradeoff-beams", type=int, nargs="*", default=[4, 1],
                    help="decoders whose trade-off is scored (beams per sample; default: beam-sample, then plain; "
                         "none given: timing only)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per arm (the minimum counts; 0: no timing)")
    ap.add_argument("--data-dir", default=None, help="the scenario's dataset folder (default dataset/toy-<...>)")
    ap.add_argument("--out", default="runs/bench-sweep")
    args = ap.parse_args()

    run = config.resolve(preset="toy", scenario=args.scenario, run_dir=args.out, checkpoint_dir=args.checkpoint_dir,
                         data_dir=args.data_dir, device="cpu")
    backbone = load_backbone("toy", run.checkpoint_dir)

    def load_model(k: int):
        """Model k of ``--sft`` on a backbone of its own (each injects its LoRA into its LMM)."""
        if not args.sft:
            return pretrained_model(run, SFTConfig.for_preset("toy"))
        return load_pigeon_model(backbone if k == 0 else load_backbone("toy", run.checkpoint_dir), args.sft[k])

    labels = [f"SFT ({f})" for f in args.sft] if args.sft else ["pre-trained (no SFT)"]
    models = [load_model(0)] + [None] * (len(labels) - 1)  # the others load on first use, once
    model, label = models[0], labels[0]
    ds = open_dataset(run.data_dir, run.scenario)
    samples = ds.samples("test")[: args.samples]
    cfg = InferenceConfig.for_preset("toy", sampling={"num_beams": args.num_beams}, batch_size=args.batch_size,
                                     seed=args.seed, **PAPER_SWEEP)
    ratios = list(cfg.ref_mask_ratios)
    print(f"model: {label}; {len(samples)} test samples of toy-{args.scenario}; {len(ratios)} ratios; "
          f"batch {cfg.batch_size}; {cfg.sampling.num_beams} beam(s); {torch.get_num_threads()} threads")

    timing = None
    if args.repeats > 0:
        timed_pass(model, ds, samples[:2], cfg, [ratios, [ratios[0]]])  # warm-up (first-call overheads)
        arms = {"separate": [], "sweep": []}
        for _ in range(args.repeats):  # alternate the two arms; the fastest repeat of each counts (shared machine)
            arms["separate"].append(timed_pass(model, ds, samples, cfg, [[r] for r in ratios]))
            arms["sweep"].append(timed_pass(model, ds, samples, cfg, [ratios]))
        sep_tok, sep_dec = (min(r[i] for r in arms["separate"]) for i in (0, 1))
        sw_tok, sw_dec = (min(r[i] for r in arms["sweep"]) for i in (0, 1))
        sep_codes, sw_codes = arms["separate"][0][2], arms["sweep"][0][2]
        n_same = sum(torch.equal(sw_codes[0][b][j], sep_codes[j][b][0]) for j in range(len(ratios))
                     for b in range(len(samples)))
        n_rows = len(ratios) * len(samples)
        same = n_same == n_rows
        timing = {"sweep": {"tokens_s": round(sw_tok, 3), "decode_s": round(sw_dec, 3)},
                  "separate": {"tokens_s": round(sep_tok, 3), "decode_s": round(sep_dec, 3)},
                  "token_stage_ratio": round(sw_tok / sep_tok, 3),
                  "end_to_end_ratio": round((sw_tok + sw_dec) / (sep_tok + sep_dec), 3),
                  "identical_tokens": same, "identical_rows": [n_same, n_rows], "repeats": args.repeats}
        print(f"token stage: sweep {sw_tok:.2f} s vs eleven separate runs {sep_tok:.2f} s → ratio "
              f"{timing['token_stage_ratio']:.3f} (identical tokens in {n_same} of {n_rows} (sample, α_r) rows; a "
              f"difference is float rounding between batch shapes flipping a near-tie draw)")
        print(f"decoding:    sweep {sw_dec:.2f} s vs separate {sep_dec:.2f} s (the same {len(samples) * len(ratios)} "
              f"images either way)")
        print(f"end to end:  ratio {timing['end_to_end_ratio']:.3f}")

    clip = load_clip("toy", run.checkpoint_dir, text_tokenizer=backbone.text_tokenizer)
    judge = load_toy_clip(run.checkpoint_dir, backbone.text_tokenizer)
    tradeoff = {}
    for beams in args.tradeoff_beams:
        decoder = "plain sampling" if beams == 1 else f"beam-sample, {beams} beams"
        tcfg = InferenceConfig.for_preset("toy", sampling={"num_beams": beams}, batch_size=args.batch_size,
                                          seed=args.seed, **PAPER_SWEEP)
        runs = []
        for k, lab in enumerate(labels):
            if models[k] is None:
                models[k] = load_model(k)
            m = models[k]
            tag = f"beams{beams}" if len(labels) == 1 else f"sft{k}-beams{beams}"
            folder = Path(args.out) / "inference" / tag / "test"
            t0 = time.perf_counter()
            res = run_sweep(m, ds, "test", folder, tcfg, max_samples=args.samples, model_label=lab, resume=False)
            sweep_s = time.perf_counter() - t0
            scores = score_sweep(res.index, folder, ds, clip)
            per, slopes = scores.per_ratio(), scores.slopes()
            factors = sweep_factor_scores(res.index, folder, ds, judge)
            for p, f in zip(per, factors):
                p["factors"] = {name: round(v, 4) for name, v in f.items() if name != "ref_mask_ratio"}
            print(f"\n{decoder}, {lab}: run_sweep with PNG files {sweep_s:.1f} s. Mean scores per α_r ({clip.name}):")
            print_rows(per)
            print_slopes(slopes, f"over the {len(scores.indices)} samples")
            runs.append({"model": lab, "run_sweep_s": round(sweep_s, 2), "per_ratio": per, "slopes": slopes})
        entry = runs[0] if len(runs) == 1 else {"runs": runs, **mean_over_runs(runs)}
        if len(runs) > 1:
            print(f"\n{decoder}: mean over the {len(runs)} SFT runs")
            print_rows(entry["per_ratio"])
            print_slopes(entry["slopes"], f"over the {len(runs)} runs (each: the mean over its samples)")
        tradeoff[f"beams{beams}"] = {"decoder": decoder, **entry}
    report = {"model": labels, "scenario": args.scenario, "samples": len(samples), "ratios": ratios,
              "batch_size": cfg.batch_size, "num_beams": cfg.sampling.num_beams, "threads": torch.get_num_threads(),
              "timing": timing, "tradeoff": tradeoff}
    out = Path(args.out) / "bench_sweep.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
