"""Stage-1 SFT: the model's loss, resume after an interruption, data parallelism (2 CPU processes, gloo).

The backbone is the toy smoke build (``python -m pigeon_utils.toy.build --smoke``, built once per session into a
temporary folder): tiny sizes, the same code path as the committed toy backbone.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pigeon_utils  # noqa: F401
from pigeon_utils.config import resolve
from pigeon_utils.sequence import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "dataset" / "toy-poster"


def build_smoke(out: Path) -> Path:
    """The toy backbone's smoke build (seconds; same code path as the committed build, tiny sizes)."""
    r = subprocess.run([sys.executable, "-m", "pigeon_utils.toy.build", "--out", str(out), "--smoke", "--no-figures"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def load_smoke(folder: Path):
    from pigeon_utils.worlds import load_backbone

    return load_backbone("toy", folder, device="cpu")


def small_cfg(**kw):
    from pigeon_utils.sft import SFTConfig

    base = dict(lr=3e-3, batch_size=4, max_steps=6, warmup_steps=2, eval_every=3, max_eval_samples=4,
                patience=10, seed=7, max_train_samples=12, adapter_only_steps=0,
                model=dict(adapter_hidden=16, mask_feedforward=32, lora_r=4, lora_alpha=8))
    model_kw = {**base.pop("model"), **kw.pop("model", {})}
    return SFTConfig.for_preset("toy", **{**base, **kw}, model=model_kw)


def run_cfg(tmp: Path, checkpoint_dir: Path | None = None):
    return resolve(preset="toy", scenario="movie", run_dir=tmp, data_dir=DATA, device="cpu",
                   checkpoint_dir=checkpoint_dir)


def trained_state(model) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.detach().clone() for part, sd in model.trainable_state().items() for k, v in sd.items()}


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory) -> Path:
    return build_smoke(tmp_path_factory.mktemp("toy-smoke") / "toy")


@pytest.fixture
def backbone_factory(smoke_dir):
    return lambda: load_smoke(smoke_dir)


def test_loss_is_token_mean_on_target_and_end(backbone_factory):
    from pigeon_utils.data import open_dataset
    from pigeon_utils.model import PigeonModel, PigeonModelConfig
    from pigeon_utils.batching import ImageTokenCache, PigeonCollator, PromptDataset

    bb = backbone_factory()
    ds = open_dataset(DATA, "movie")
    model = PigeonModel(bb, PigeonModelConfig(adapter_hidden=16, mask_feedforward=32, lora_dropout=0.0,
                                              adapter_dropout=0.0, mask_dropout=0.0)).eval()
    sset = PromptDataset(ds, "train", bb, max_samples=3)
    batch = PigeonCollator(ImageTokenCache(ds, bb.tokenizer), bb.layout, seed=0)([sset[i] for i in range(3)])
    out = model(batch, 0.5)
    # reference: the plain HF causal-LM loss on the same embeddings (it shifts and token-averages)
    x, _ = model.input_embeddings(batch, 0.5, inference=False)
    ref = model.lmm(inputs_embeds=x, attention_mask=batch.seq.attention_mask, position_ids=batch.seq.position_ids,
                    labels=batch.seq.labels).loss
    assert out.num_tokens == (batch.seq.labels != IGNORE_INDEX).sum()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    # masked history tokens are zero input vectors, attention kept; E sits at the <emb> slot
    scale = batch.seq.keep_scale(out.keep.keep)
    assert (scale == 0).any() and (batch.seq.attention_mask[scale == 0] == 1).all()
    assert (x[scale == 0] == 0).all()
    e = x[torch.arange(3), batch.seq.emb_position]
    assert (e.abs() <= 1).all() and not torch.equal(e, model.token_embeddings(batch.seq.input_ids)[
        torch.arange(3), batch.seq.emb_position])


def _model_and_batch(backbone_factory, straight_through: bool):
    """A small PigeonModel on a fresh smoke backbone and a two-sample training batch."""
    from pigeon_utils.data import open_dataset
    from pigeon_utils.model import PigeonModel, PigeonModelConfig
    from pigeon_utils.batching import ImageTokenCache, PigeonCollator, PromptDataset

    ds = open_dataset(DATA, "movie")
    bb = backbone_factory()
    model = PigeonModel(bb, PigeonModelConfig(adapter_hidden=16, mask_feedforward=32,
                                              straight_through=straight_through))
    sset = PromptDataset(ds, "train", bb, max_samples=2)
    batch = PigeonCollator(ImageTokenCache(ds, bb.tokenizer), bb.layout, seed=0)([sset[0], sset[1]])
    return model, batch


def test_gradients_reach_lora_adapter_and_mask_generator(backbone_factory):
    for st in (True, False):
        model, batch = _model_and_batch(backbone_factory, st)
        # LoRA B starts at 0, so only lora_B gets a gradient at step 0 — enough to see the path
        model(batch, 0.3).loss.backward()
        got = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert {"lmm", "adapter"} <= got
        assert ("mask_generator" in got) is st
        assert not any(p.requires_grad for p in model.detokenizer.parameters())
        base = [n for n, p in model.lmm.named_parameters() if p.requires_grad and "lora_" not in n]
        assert base == []


def test_reference_keep_values_carry_gradient_through_the_detokenizer(backbone_factory):
    """Straight-through: the reference mask's keep values weight the detokenizer input (docs/algorithm.md §2.8)."""
    for st in (True, False):
        model, batch = _model_and_batch(backbone_factory, st)
        keep = torch.ones(batch.masks.ids.shape, requires_grad=True)
        model.reference_embedding(batch.masks, keep).sum().backward()
        ref = batch.masks.reference_code_mask
        if st:
            assert keep.grad is not None and (keep.grad[ref] != 0).any() and (keep.grad[~ref] == 0).all()
        else:
            assert keep.grad is None or (keep.grad == 0).all()


@pytest.mark.parametrize("adapter_only_steps", [0, 3])
def test_resume_matches_uninterrupted_run(tmp_path, backbone_factory, adapter_only_steps):
    from pigeon_utils.sft import train_sft
    from pigeon_utils.train import latest_checkpoint

    cfg = small_cfg(adapter_only_steps=adapter_only_steps)
    a = train_sft(cfg, run_cfg(tmp_path / "a"), backbone=backbone_factory(), progress=False)
    b1 = train_sft(cfg, run_cfg(tmp_path / "b"), backbone=backbone_factory(), progress=False, interrupt_after=4)
    assert b1.steps == 4 and latest_checkpoint(tmp_path / "b" / "sft").name == "checkpoint-4"
    if adapter_only_steps:  # after 3 adapter-only steps and one more, LoRA B (zero at the start) moved once
        early = train_sft(cfg, run_cfg(tmp_path / "c"), backbone=backbone_factory(), progress=False,
                          interrupt_after=3)
        s3, s4 = trained_state(early.model), trained_state(b1.model)
        lora_b = [k for k in s3 if "lora_B" in k]
        assert lora_b and all(s3[k].abs().sum() == 0 for k in lora_b)
        assert any(s4[k].abs().sum() > 0 for k in lora_b)
        from pigeon_utils.model import PigeonModel

        bb = backbone_factory()
        torch.manual_seed(cfg.seed)  # the initial state, as train_sft initialises it (backbone loaded first)
        init = trained_state(PigeonModel(bb, cfg.model))
        ad = [k for k in s3 if k.startswith("adapter.")]
        assert ad and all(not torch.equal(s3[k], init[k]) for k in ad)
    b2 = train_sft(cfg, run_cfg(tmp_path / "b"), backbone=backbone_factory(), progress=False, resume=True)
    assert a.steps == b2.steps == 6
    sa, sb = trained_state(a.model), trained_state(b2.model)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [e["loss"] for e in a.log["train"]] == pytest.approx([e["loss"] for e in b2.log["train"]], rel=1e-5)
    # weights did move, and the run wrote what later stages read
    assert a.log["valid"][0]["step"] == 0 and len(a.log["valid"]) == 3
    for f in ("lora/adapter_config.json", "adapter.safetensors", "mask_generator.safetensors", "pigeon_model.json"):
        assert (tmp_path / "a" / "sft" / "best" / f).is_file(), f
    ck = tmp_path / "a" / "sft" / "checkpoint-6"
    for f in ("optimizer.pt", "scheduler.json", "rng_state.pt", "trainer_state.json"):
        assert (ck / f).is_file(), f
    # resuming reads nothing that can run code: tensors and numbers only, and JSON
    for f in ("optimizer.pt", "rng_state.pt"):
        torch.load(ck / f, map_location="cpu", weights_only=True)
    json.loads((ck / "scheduler.json").read_text())
    assert not list((tmp_path / "a" / "sft").glob(".*tmp*"))


def test_linear_schedule_is_transformers_linear_schedule():
    from transformers import get_linear_schedule_with_warmup

    from pigeon_utils.train import linear_schedule

    for warmup, total in ((20, 600), (0, 7), (5, 5)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        hf = get_linear_schedule_with_warmup(opt, warmup, total).lr_lambdas[0]
        assert [linear_schedule(s, warmup, total) for s in range(total + 3)] == [hf(s) for s in range(total + 3)]


def test_bad_config_values_are_named():
    from pigeon_utils.sft import SFTConfig

    with pytest.raises(ValueError, match="batch_size"):
        SFTConfig.for_preset("toy", batch_size=0)
    with pytest.raises(ValueError, match="mask_type"):
        SFTConfig.for_preset("toy", model=dict(mask_type="nope"))
    with pytest.raises(ValueError, match="preset"):
        SFTConfig.for_preset("big")
    with pytest.raises(ValueError, match="adapter_only_steps"):
        SFTConfig.for_preset("toy", adapter_only_steps=-1)
    assert SFTConfig.for_preset("lavit").adapter_only_steps == 0  # the reference trains everything from the start


# ------------------------------------------------------------------------------------------- data parallel
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_SCRIPT = r"""
import sys, torch
import pigeon_utils
sys.path.insert(0, {tests!r})
from test_sft import load_smoke, small_cfg, run_cfg, trained_state
from pigeon_utils.sft import train_sft
from pathlib import Path
torch.set_num_threads(1)
# no dropout anywhere: each process draws its own dropout masks (same config as the single-process run)
cfg = small_cfg(max_steps=3, eval_every=3, model=dict(lora_dropout=0.0, adapter_dropout=0.0, mask_dropout=0.0,
                                                      mask_encoder_dropout=0.0))
res = train_sft(cfg, run_cfg(Path({out!r}), Path({smoke!r})), backbone=load_smoke(Path({smoke!r})), progress=False)
import torch.distributed as dist
rank = dist.get_rank() if dist.is_initialized() else 0
if rank == 0:
    torch.save({{"state": trained_state(res.model), "log": res.log}}, Path({out!r}) / "result.pt")
"""


def _run_ddp(out: Path, nproc: int, smoke: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    script = out / "train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), smoke=str(smoke)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", "--master_addr=127.0.0.1", str(script)]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out / "result.pt", weights_only=True)


def test_two_process_data_parallel_matches_single_process(tmp_path, smoke_dir):
    from pigeon_utils.sft import train_sft

    cfg = small_cfg(max_steps=3, eval_every=3, model=dict(lora_dropout=0.0, adapter_dropout=0.0, mask_dropout=0.0,
                                                          mask_encoder_dropout=0.0))
    res = train_sft(cfg, run_cfg(tmp_path / "one", smoke_dir), backbone=load_smoke(smoke_dir), progress=False)
    one = {"state": trained_state(res.model), "log": res.log}
    two = _run_ddp(tmp_path / "two", 2, smoke_dir)
    assert [e["loss"] for e in one["log"]["train"]] == pytest.approx([e["loss"] for e in two["log"]["train"]],
                                                                    rel=1e-4)
    assert one["log"]["valid"][-1]["loss"] == pytest.approx(two["log"]["valid"][-1]["loss"], rel=1e-4)
    for k in one["state"]:
        torch.testing.assert_close(one["state"][k], two["state"][k], rtol=1e-4, atol=1e-5, msg=k)
    moved = [k for k in one["state"] if "lora_B" in k]
    assert moved and any(one["state"][k].abs().sum() > 0 for k in moved)
