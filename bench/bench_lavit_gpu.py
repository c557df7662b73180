"""Throughput of the 7B-shaped LaVIT LMM: Stage-1 SFT step (LoRA) and visual-token generation with the KV cache.

What is measured (random weights, no checkpoint needed):

* **SFT**: ``LlamaForCausalLM`` shaped like LaVIT-7B-v2's LLM (hidden 4096, 32 layers, 32 heads, FFN 11008, vocab 48386)
  in bf16, frozen, with peft LoRA r=8 / α=16 / dropout 0.05 on ``q_proj``/``v_proj`` (docs/algorithm.md §3.1),
  gradient checkpointing (as ``prepare_model_for_kbit_training`` enables), AdamW on the LoRA weights; batch 16 of
  800-token sequences (T_text + 6·n̄ + 2 ≈ 800) with full-vocabulary logits and loss. Reports tokens/s,
  ``torch.cuda.max_memory_allocated`` and MFU against the GPU's dense bf16 peak (``--peak-tflops``).
* **Generation**: the same LoRA model sampling visual tokens (top-k 50, text ids 3..31999 suppressed, exactly
  ``--gen-tokens`` new tokens) after an ``--gen-prompt``-token prompt, batch ``--gen-batch``; visual tokens/s overall
  and for the decode phase alone (prefill timed separately).

FLOPs per token (forward) = 2·N + 4·n_layers·L·d, N = the matmul parameters (attention + MLP + lm_head, embeddings
excluded), L = sequence length, d = hidden size (PaLM's convention, full attention matrix). With the base weights
frozen, backward needs activation gradients only (≈ 1× forward; the LoRA weight gradients are negligible), so the
model FLOPs of an SFT step are 2× forward (``mfu``); gradient checkpointing re-runs the forward, so the hardware
executes 3× forward (``hfu``).

Usage::

    python bench/bench_lavit_gpu.py                       # CUDA, paper sizes (H100/H200 peak 989 TFLOP/s dense bf16)
    python bench/bench_lavit_gpu.py --peak-tflops 312     # e.g. A100
    python bench/bench_lavit_gpu.py --tiny                # CPU, tiny sizes: checks that the script works
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pigeon_utils  # noqa: E402,F401  (offline defaults, torchvision guard; before transformers / peft)
import torch  # noqa: E402

REAL = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=48386, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=32002 + 512, max_position_embeddings=4096, rms_norm_eps=1e-5)
VISUAL_OFFSET = 32002  # visual id = 32002 + code


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (fp32), small batch: a smoke run")
    p.add_argument("--batch", type=int, default=None, help="SFT batch (default 16; --tiny: 2)")
    p.add_argument("--seq-len", type=int, default=None, help="SFT sequence length (default 800; --tiny: 64)")
    p.add_argument("--steps", type=int, default=None, help="timed SFT steps (default 5; --tiny: 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed SFT steps first")
    p.add_argument("--no-grad-ckpt", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--gen-batch", type=int, default=None,
                   help="generation batch (default 4 = Pigeon's beams; --tiny: 2)")
    p.add_argument("--gen-prompt", type=int, default=None, help="prompt tokens (default 800; --tiny: 32)")
    p.add_argument("--gen-tokens", type=int, default=None, help="new visual tokens (default 256; --tiny: 8)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the GPU in TFLOP/s for MFU (default 989 = H100/H200 SXM on CUDA)")
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    small = args.tiny
    for name, real, tiny in (("batch", 16, 2), ("seq_len", 800, 64), ("steps", 5, 2), ("gen_batch", 4, 2),
                             ("gen_prompt", 800, 32), ("gen_tokens", 256, 8)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else real)
    return args


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(cfg: dict, device: torch.device, dtype: torch.dtype):
    """Random-weight LlamaForCausalLM built directly on `device` in `dtype`, frozen, with LoRA on q_proj/v_proj."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(bos_token_id=1, eos_token_id=2, **cfg)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"], bias="none",
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora), config


def forward_flops_per_token(config, seq_len: int) -> float:
    d, layers, ff, v = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * ff  # q, o, k, v, gate/up/down
    n_matmul = layers * per_layer + d * v  # + lm_head
    return 2.0 * n_matmul + 4.0 * layers * seq_len * d


def bench_sft(model, config, args, device: torch.device) -> dict:
    base = model.get_base_model()
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x
        def enable():
            base.activation_checkpointing_enable({"use_reentrant": False})
        disable = base.activation_checkpointing_disable
    else:
        def enable():
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        disable = base.gradient_checkpointing_disable
    if not args.no_grad_ckpt:
        enable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(VISUAL_OFFSET, config.vocab_size, (args.batch, args.seq_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    def step() -> float:
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    sync(device)
    dt = time.perf_counter() - t0
    tokens = args.batch * args.seq_len * args.steps
    tps = tokens / dt
    fwd = forward_flops_per_token(config, args.seq_len)
    out = {"batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "grad_ckpt": not args.no_grad_ckpt,
           "trainable_params": sum(p.numel() for p in params), "step_s": dt / args.steps, "tokens_per_s": tps,
           "loss_last": losses[-1], "model_tflops_per_s": tps * 2 * fwd / 1e12,
           "hardware_tflops_per_s": tps * (3 if not args.no_grad_ckpt else 2) * fwd / 1e12}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.peak_tflops:
        out["mfu"] = out["model_tflops_per_s"] / args.peak_tflops
        out["hfu"] = out["hardware_tflops_per_s"] / args.peak_tflops
    disable()
    del opt
    return out


class SuppressRange:
    """Logits processor: ids ``lo .. hi-1`` (the text pieces 3..31999, as Pigeon suppresses) get -inf, by slicing."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores[:, self.lo:self.hi] = float("-inf")
        return scores


@torch.no_grad()
def bench_generation(model, config, args, device: torch.device) -> dict:
    model.eval()
    g = torch.Generator(device="cpu").manual_seed(1)
    prompt = torch.randint(3, config.vocab_size, (args.gen_batch, args.gen_prompt), generator=g).to(device)
    prompt[:, -1] = 32000  # [IMG]: visual tokens follow
    mask = torch.ones_like(prompt)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    model(input_ids=prompt, attention_mask=mask, use_cache=True)  # prefill alone
    sync(device)
    prefill = time.perf_counter() - t0
    from transformers import LogitsProcessorList

    kw = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=True, top_k=50, top_p=1.0,
              temperature=1.0, use_cache=True, pad_token_id=2, bos_token_id=32000, eos_token_id=32001,
              logits_processor=LogitsProcessorList([SuppressRange(3, 32000)]))
    model.generate(input_ids=prompt[:, :8], attention_mask=mask[:, :8], **{**kw, "max_new_tokens": 2,
                                                                         "min_new_tokens": 2})  # warm-up
    sync(device)
    t0 = time.perf_counter()
    seqs = model.generate(input_ids=prompt, attention_mask=mask, **kw)
    sync(device)
    total = time.perf_counter() - t0
    new = seqs[:, prompt.shape[1]:]
    n = new.numel()
    visual = int((new >= VISUAL_OFFSET).sum()) + int((new <= 2).sum())  # text ids 3..31999 are suppressed
    out = {"batch": args.gen_batch, "prompt_tokens": args.gen_prompt, "new_tokens": args.gen_tokens,
           "total_s": total, "prefill_s": prefill, "visual_tokens_per_s": n / total,
           "decode_tokens_per_s": n / max(total - prefill, 1e-9), "non_text_fraction": visual / n}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.tiny:
        device, dtype, cfg = torch.device("cpu"), torch.float32, TINY
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: this benchmark needs a GPU at the paper's sizes; run with --tiny to "
                             "check the script on the CPU")
        device, dtype, cfg = torch.device("cuda"), torch.bfloat16, REAL
        if args.peak_tflops is None:
            args.peak_tflops = 989.0
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, config = build_model(cfg, device, dtype)
    sync(device)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__, "tiny": args.tiny,
            "params": sum(p.numel() for p in model.parameters()), "build_s": time.perf_counter() - t0,
            "peak_tflops": args.peak_tflops}
    results = {"setup": info, "sft": bench_sft(model, config, args, device)}
    if not args.skip_generation:
        results["generation"] = bench_generation(model, config, args, device)
    if device.type == "cpu":
        results["setup"]["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
