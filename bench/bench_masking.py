"""Benchmark: batched Gumbel top-k keep selection vs a per-sample Python loop (not a test).

Batch: 64 samples × (5 history + 1 reference) images of 40-120 tokens each. Both implementations get the
same cosine scores and the same Exponential(1) noise; the script checks that their keep decisions are
identical, then times the full selection (keep probabilities + Gumbel top-k for history and reference, in
training mode: target q = 1 − p) and prints both times and the ratio.

    .venv/bin/python bench/bench_masking.py [--device cpu|cuda] [--repeats 20] [--batch 64]

The per-sample reference implementation below is kept deliberately simple: one loop over samples, one
``topk`` per sample and group, the way the released code does it.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import pigeon_utils  # noqa: F401
from pigeon_utils.keep import gumbel_topk_keep, keep_probabilities, layout_from_counts


def per_sample_keep(cos_sim, type_ids, exp_hist, exp_target, hist_mask_ratio, ref_mask_ratio, inference):
    """The same rule, one sample and one group at a time (Python loop over the batch)."""
    keep = torch.zeros_like(cos_sim)
    for b in range(cos_sim.shape[0]):
        for group_type, ratio, noise in ((1, hist_mask_ratio, exp_hist), (2, ref_mask_ratio, exp_target)):
            idx = (type_ids[b] == group_type).nonzero().flatten()
            n = len(idx)
            if n == 0:
                continue
            p = torch.softmax(cos_sim[b, idx], dim=-1)
            q = p if (group_type == 1 or inference) else 1.0 - p
            k = max(1, int(n * (1 - ratio)))
            z = q.clamp_min(torch.finfo(q.dtype).tiny).log() - noise[b, idx].log()
            y_soft = torch.softmax(z, dim=-1)
            y_hard = torch.zeros_like(z)
            y_hard[torch.topk(z, k).indices] = 1.0
            keep[b, idx] = y_hard - y_soft.detach() + y_soft
    return keep


def batched_keep(cos_sim, type_ids, exp_hist, exp_target, hist_mask_ratio, ref_mask_ratio, inference):
    hist_q, target_q = keep_probabilities(cos_sim, type_ids, inference=inference)
    hk, _ = gumbel_topk_keep(hist_q, type_ids == 1, hist_mask_ratio, exponential=exp_hist)
    tk, _ = gumbel_topk_keep(target_q, type_ids == 2, ref_mask_ratio, exponential=exp_target)
    return hk + tk


def timeit(fn, repeats, device):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = torch.device(args.device)

    g = torch.Generator().manual_seed(args.seed)
    counts = torch.randint(40, 121, (args.batch, 6), generator=g)
    _, type_ids, pad = layout_from_counts(counts)
    cos = (torch.rand(type_ids.shape, generator=g) * 2 - 1).masked_fill(pad, 0.0)
    exp_h = torch.empty(type_ids.shape).exponential_(generator=g)
    exp_t = torch.empty(type_ids.shape).exponential_(generator=g)
    cos, type_ids, exp_h, exp_t = (t.to(device) for t in (cos, type_ids, exp_h, exp_t))
    cos.requires_grad_(True)  # as in training: the keep decisions carry the straight-through graph
    alpha_h, alpha_r = 0.2, 0.5

    def ours():
        return batched_keep(cos, type_ids, exp_h, exp_t, alpha_h, alpha_r, False)

    def loop():
        return per_sample_keep(cos, type_ids, exp_h, exp_t, alpha_h, alpha_r, False)

    a, b = ours(), loop()
    if not torch.equal(a.detach() != 0, b.detach() != 0):
        raise SystemExit("MISMATCH: batched and per-sample keep decisions differ")
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    for _ in range(3):  # warm-up
        ours(), loop()
    t_ours = timeit(ours, args.repeats, device)
    t_loop = timeit(loop, args.repeats, device)
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"batch={args.batch} samples x 6 images, tokens/image 40-120, padded length L={type_ids.shape[1]}, "
          f"valid tokens={int((type_ids > 0).sum())}; alpha_h={alpha_h}, alpha_r={alpha_r}, training mode")
    print("keep decisions identical: yes")
    print(f"batched (ours)      : {t_ours * 1e3:9.3f} ms  (median of {args.repeats})")
    print(f"per-sample loop     : {t_loop * 1e3:9.3f} ms  (median of {args.repeats})")
    print(f"speed-up loop/ours  : {t_loop / t_ours:9.1f}x")


if __name__ == "__main__":
    main()
