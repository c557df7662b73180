"""Benchmark: the α_r sweep in one shared-prefix pass vs eleven separate runs, and the α_r trade-off (not a test).

On the toy backbone on the CPU, for the same test samples, seed and batch size, side by side in one process:

* **sweep** — :func:`pigeon_utils.inference.sweep_tokens` over all ratios at once (the prompt up to the ``<emb>``
  slot read once per sample, its KV cache repeated over the ratios, one mask-generator and one detokenizer pass
  for all ratios), then the images decoded per sample;
* **separate** — what the paper does (one inference run per α_r, spec §5.3): for each α_r the images are tokenized
  again, the whole prompt is read for that α_r alone, and the images are decoded per batch.

Both produce the same visual tokens (same per-row seeds). The arms alternate ``--repeats`` times and the fastest repeat
of each counts (the machine is shared). Printed: seconds for the token stage (tokenization, masks,
LMM, sampling), for decoding, and both ratios sweep / separate (with the decoder of ``--num-beams``, plain sampling
by default). Then, for each decoder of ``--tradeoff-beams`` (default: the reference's beam-sample, 4 beams, and plain
sampling), ``run_sweep`` writes the sweep's images and the toy CLIP scores them: mean history CIS and reference CS
per α_r (the paper's trade-off: CIS rises, CS falls as α_r grows), with the toy factors that explain them (glyph and
colour = the reference's, style = the history's). Everything goes to ``<out>/bench_sweep.json``.

    .venv/bin/python bench/bench_sweep.py [--sft runs/toy-sticker/sft/best] [--scenario sticker] [--samples 32]
                                          [--batch-size 4] [--num-beams 1] [--tradeoff-beams 4 1]
                                          [--checkpoint-dir checkpoints/toy] [--data-dir DIR] [--out runs/bench-sweep]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pigeon_utils  # noqa: F401
import torch

from pigeon_utils import config
from pigeon_utils.backbone import load_backbone
from pigeon_utils.data import open_dataset
from pigeon_utils.inference import (InferenceConfig, SeededImageTokens, row_seed, run_sweep, sweep_batch,
                                    sweep_tokens)
from pigeon_utils.scoring import load_clip, score_sweep, sweep_factor_scores
from pigeon_utils.sft import SFTConfig, load_sft_model, pretrained_model
from pigeon_utils.toy.load import load_toy_clip


def timed_pass(model, ds, samples, cfg: InferenceConfig,
               ratios_per_run: list[list[float]]) -> tuple[float, float, list]:
    """Run the given α_r groups one after the other, each as a complete run over `samples` (fresh image tokens,
    prompts, token generation, decoding). Returns (token seconds, decode seconds, codes[run][b][r])."""
    t_tok = t_dec = 0.0
    out = []
    for ratios in ratios_per_run:
        t0 = time.perf_counter()
        tokens = SeededImageTokens(ds, model.backbone.tokenizer, cfg.seed)  # a separate run tokenizes again
        codes = []
        for k0 in range(0, len(samples), cfg.batch_size):
            ks = list(range(k0, min(k0 + cfg.batch_size, len(samples))))
            batch = sweep_batch(ds, [samples[k] for k in ks], ks, model.backbone, tokens, cfg.seed)
            codes += sweep_tokens(model, batch.to(model.device), ratios, cfg.sampling, seed=cfg.seed)
        t_tok += time.perf_counter() - t0
        t0 = time.perf_counter()
        if len(ratios) > 1:  # the sweep: one decoder batch per sample (its images at every α_r)
            for k, per_ratio in enumerate(codes):
                model.decode(per_ratio, generator=torch.Generator().manual_seed(row_seed(cfg.seed, k)))
        else:  # a separate run: one decoder batch per sample batch
            for k0 in range(0, len(codes), cfg.batch_size):
                model.decode([c[0] for c in codes[k0:k0 + cfg.batch_size]],
                             generator=torch.Generator().manual_seed(row_seed(cfg.seed, k0)))
        t_dec += time.perf_counter() - t0
        out.append(codes)
    return t_tok, t_dec, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint-dir", default=None, help="toy checkpoint (default checkpoints/toy)")
    ap.add_argument("--sft", default=None, help="Stage-1 folder (run_dir/sft/best); default: the pre-trained model")
    ap.add_argument("--scenario", default="movie", choices=["movie", "sticker"])
    ap.add_argument("--samples", type=int, default=32, help="test samples")
    ap.add_argument("--batch-size", type=int, default=4, help="samples per LMM batch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-beams", type=int, default=1, help="decoder of the timing: 1: plain sampling (default); "
                                                             "4: the reference's beam-sample")
    ap.add_argument("--tradeoff-beams", type=int, nargs="+", default=[4, 1],
                    help="decoders whose trade-off is scored (beams per sample; default: beam-sample, then plain)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per arm (the minimum counts)")
    ap.add_argument("--data-dir", default=None, help="the scenario's dataset folder (default dataset/toy-<...>)")
    ap.add_argument("--out", default="runs/bench-sweep")
    args = ap.parse_args()

    run = config.resolve(preset="toy", scenario=args.scenario, run_dir=args.out, checkpoint_dir=args.checkpoint_dir,
                         data_dir=args.data_dir, device="cpu")
    backbone = load_backbone("toy", run.checkpoint_dir)
    if args.sft:
        model, label = load_sft_model(backbone, args.sft), f"SFT ({args.sft})"
    else:
        model, label = pretrained_model(run, SFTConfig.for_preset("toy")), "pre-trained (no SFT)"
    ds = open_dataset(run.data_dir, run.scenario)
    samples = ds.samples("test")[: args.samples]
    cfg = InferenceConfig.for_preset("toy", sampling={"num_beams": args.num_beams}, batch_size=args.batch_size,
                                     seed=args.seed)
    ratios = list(cfg.ref_mask_ratios)
    print(f"model: {label}; {len(samples)} test samples of toy-{args.scenario}; {len(ratios)} ratios; "
          f"batch {cfg.batch_size}; {cfg.sampling.num_beams} beam(s); {torch.get_num_threads()} threads")

    timed_pass(model, ds, samples[:2], cfg, [ratios, [ratios[0]]])  # warm-up (first-call overheads)
    runs = {"separate": [], "sweep": []}
    for _ in range(args.repeats):  # alternate the two arms; the fastest repeat of each counts (shared machine)
        runs["separate"].append(timed_pass(model, ds, samples, cfg, [[r] for r in ratios]))
        runs["sweep"].append(timed_pass(model, ds, samples, cfg, [ratios]))
    sep_tok, sep_dec = (min(r[i] for r in runs["separate"]) for i in (0, 1))
    sw_tok, sw_dec = (min(r[i] for r in runs["sweep"]) for i in (0, 1))
    sep_codes, sw_codes = runs["separate"][0][2], runs["sweep"][0][2]
    same = all(torch.equal(sw_codes[0][b][j], sep_codes[j][b][0]) for j in range(len(ratios))
               for b in range(len(samples)))
    timing = {"sweep": {"tokens_s": round(sw_tok, 3), "decode_s": round(sw_dec, 3)},
              "separate": {"tokens_s": round(sep_tok, 3), "decode_s": round(sep_dec, 3)},
              "token_stage_ratio": round(sw_tok / sep_tok, 3),
              "end_to_end_ratio": round((sw_tok + sw_dec) / (sep_tok + sep_dec), 3),
              "identical_tokens": same, "repeats": args.repeats}
    print(f"token stage: sweep {sw_tok:.2f} s vs eleven separate runs {sep_tok:.2f} s → ratio "
          f"{timing['token_stage_ratio']:.3f} (identical tokens: {same})")
    print(f"decoding:    sweep {sw_dec:.2f} s vs separate {sep_dec:.2f} s (the same {len(samples) * len(ratios)} "
          f"images either way)")
    print(f"end to end:  ratio {timing['end_to_end_ratio']:.3f}")

    clip = load_clip("toy", run.checkpoint_dir, text_tokenizer=backbone.text_tokenizer)
    judge = load_toy_clip(run.checkpoint_dir, backbone.text_tokenizer)
    tradeoff = {}
    for beams in args.tradeoff_beams:
        tcfg = InferenceConfig.for_preset("toy", sampling={"num_beams": beams}, batch_size=args.batch_size,
                                          seed=args.seed)
        folder = Path(args.out) / "inference" / f"beams{beams}" / "test"
        t0 = time.perf_counter()
        res = run_sweep(model, ds, "test", folder, tcfg, max_samples=args.samples, model_label=label, resume=False)
        sweep_s = time.perf_counter() - t0
        per = score_sweep(res.index, folder, ds, clip).per_ratio()
        decoder = "plain sampling" if beams == 1 else f"beam-sample, {beams} beams"
        print(f"\n{decoder}: run_sweep with PNG files {sweep_s:.1f} s. Mean scores per α_r ({clip.name}):")
        factors = sweep_factor_scores(res.index, folder, ds, judge)
        print(f"{'α_r':>5s}{'history CIS':>13s}{'reference CS':>14s}{'glyph = ref':>13s}{'colour = ref':>14s}"
              f"{'style = history':>17s}")
        for p, f in zip(per, factors):
            p["factors"] = {k: round(v, 4) for k, v in f.items() if k != "ref_mask_ratio"}
            print(f"{p['ref_mask_ratio']:>5.1f}{p['history_cis']:>13.2f}{p['reference_cs']:>14.2f}"
                  f"{f['semantic']:>13.1%}{f['colour_vs_reference']:>14.1%}{f['style']:>17.1%}")
        tradeoff[f"beams{beams}"] = {"decoder": decoder, "run_sweep_s": round(sweep_s, 2), "per_ratio": per}
    report = {"model": label, "scenario": args.scenario, "samples": len(samples), "ratios": ratios,
              "batch_size": cfg.batch_size, "num_beams": cfg.sampling.num_beams, "threads": torch.get_num_threads(),
              "timing": timing, "tradeoff": tradeoff}
    out = Path(args.out) / "bench_sweep.json"
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
