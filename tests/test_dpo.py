"""Stage-2 DPO (docs/algorithm.md §4): the loss, one concatenated pass, the frozen reference, cached reference
log-probs, resume, a training run that learns, data parallelism (2 CPU processes, gloo).

The backbone is the toy smoke build (as in tests/test_sft.py); the Stage-1 model is a small PigeonModel whose LoRA is
set to random values (so the reference differs from the base LMM), and the pairs are real toy token sequences:
chosen = the sample's target image, rejected = the next sample's.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pigeon_utils  # noqa: F401
from test_sft import DATA, REPO, _free_port, build_smoke, load_smoke, run_cfg

TRL_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"}
SEED = 7


def dpo_cfg(**kw):
    from pigeon_utils.dpo import DPOConfig

    base = dict(lr=2e-2, beta=0.5, batch_size=4, max_steps=4, warmup_steps=0, eval_every=2, max_eval_samples=4,
                patience=10, seed=SEED)
    return DPOConfig.for_preset("toy", **{**base, **kw})


def toy_pairs(backbone, split: str, n: int) -> list[dict]:
    from pigeon_utils.batching import ImageTokenCache
    from pigeon_utils.data import open_dataset

    ds = open_dataset(DATA, "movie")
    s = ds.samples(split)[: n + 1]
    codes = ImageTokenCache(ds, backbone.tokenizer).codes([x.target for x in s])
    return [{"index": k, "chosen": codes[k].tolist(), "rejected": codes[k + 1].tolist()} for k in range(n)]


def make_stage1(smoke: Path, folder: Path) -> Path:
    from pigeon_utils.model import PigeonModel, PigeonModelConfig

    torch.manual_seed(0)
    model = PigeonModel(load_smoke(smoke), PigeonModelConfig(adapter_hidden=16, mask_feedforward=32, lora_r=4,
                                                             lora_alpha=8))
    with torch.no_grad():  # a Stage-1 LoRA that is not the identity
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    pairs = {"train": toy_pairs(model.backbone, "train", 8), "valid": toy_pairs(model.backbone, "valid", 4)}
    pairs["train"][0]["ref_mask_ratio"] = 1.0  # a pair that brings its own α_r
    (folder / "pairs.json").write_text(json.dumps(pairs))
    return folder


def read_pairs(stage1: Path) -> dict:
    return json.loads((stage1 / "pairs.json").read_text())


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.fixture(scope="session")
def smoke(tmp_path_factory) -> Path:
    return build_smoke(tmp_path_factory.mktemp("dpo-smoke") / "toy")


@pytest.fixture(scope="session")
def stage1(smoke, tmp_path_factory) -> Path:
    return make_stage1(smoke, tmp_path_factory.mktemp("stage1") / "best")


def test_loss_matches_hand_computation_and_is_ln2_at_the_reference():
    from pigeon_utils.dpo import dpo_loss, dpo_metrics

    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -5.0]), torch.tensor([-11.5, -2.0])
    losses, wc, wr = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: Δ = (1) − (−0.5) = 1.5; pair 1: Δ = (1) − (−1) = 2
    want = [math.log1p(math.exp(-0.15)), math.log1p(math.exp(-0.2))]
    assert losses.tolist() == pytest.approx(want, rel=1e-6)
    assert wc.tolist() == pytest.approx([0.1, 0.1]) and wr.tolist() == pytest.approx([-0.05, -0.1])
    m = dpo_metrics(pc, pr, wc, wr)
    assert set(m) == TRL_KEYS and float(m["rewards/accuracies"]) == 1.0
    assert float(m["rewards/margins"]) == pytest.approx(0.175) and float(m["logps/rejected"]) == -7.5
    losses, wc, wr = dpo_loss(pc, pr, pc, pr, beta=0.1)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2, rel=1e-7)
    assert wc.abs().sum() == 0 and wr.abs().sum() == 0
    assert float(dpo_metrics(pc, pr, wc, wr)["rewards/accuracies"]) == 0.0  # ties are not accurate


def test_one_pass_equals_separate_passes_and_stage1_scores(smoke, stage1):
    from pigeon_utils.batching import ImageTokenCache
    from pigeon_utils.checkpoints import load_pigeon_model
    from pigeon_utils.data import open_dataset
    from pigeon_utils.dpo import pair_keep, pair_log_probs
    from pigeon_utils.dpo_data import PairCollator, PairDataset
    from pigeon_utils.model import PigeonBatch
    from pigeon_utils.sequence import IGNORE_INDEX, IMG_START

    model = load_pigeon_model(load_smoke(smoke), stage1)
    ds = open_dataset(DATA, "movie")
    pairs = read_pairs(stage1)["train"][:4]
    dset = PairDataset(ds, "train", pairs, model.backbone)
    items = [dset[i] for i in range(4)]
    tokens = ImageTokenCache(ds, model.backbone.tokenizer, seed=SEED)
    coll = {s: PairCollator(tokens, model.layout, SEED, "train", sides=s)
            for s in (("chosen", "rejected"), ("chosen",), ("rejected",))}
    batch = coll[("chosen", "rejected")](items)
    with torch.no_grad():
        both = pair_log_probs(model, batch)
        apart = torch.cat([pair_log_probs(model, coll[(s,)](items)) for s in ("chosen", "rejected")])
    torch.testing.assert_close(both, apart, rtol=1e-5, atol=1e-4)
    assert (both < 0).all() and batch.ratio[0] == 1.0 and len(set(batch.ratio.tolist())) == 4
    keep = pair_keep(model, batch)  # each pair's keep decisions at its own α_r
    for b in range(4):
        one = model.keep_mask(batch.masks, float(batch.ratio[b]), inference=False, noise=batch.noise).keep[b]
        assert torch.equal(keep[b], one.detach())
    # at one α_r, −Σ of the chosen rows' scores is Stage 1's loss on the same rows (every target token scored)
    same = [{**it, "ref_mask_ratio": 0.4} for it in items]
    chosen = coll[("chosen",)](same)
    with torch.no_grad():
        lp = pair_log_probs(model, chosen)
        sft = model(PigeonBatch(seq=chosen.seq, masks=chosen.masks, noise=chosen.noise), 0.4)
    torch.testing.assert_close(-lp.sum(), sft.loss_sum, rtol=1e-5, atol=1e-4)
    assert int(sft.num_tokens) == sum(len(p["chosen"]) + 1 for p in pairs)
    # upstream rows: no [IMG]; y1 sits in its place, unscored
    up = PairCollator(tokens, model.layout, SEED, "train", response_tokens="reference")(items).seq
    start = up.token_type == IMG_START
    assert not (up.input_ids[start] == model.layout.img_id).any()
    assert up.input_ids[start].tolist() == [p[s][0] + model.layout.visual_offset for s in ("chosen", "rejected")
                                            for p in pairs]
    assert int((up.labels != IGNORE_INDEX).sum()) == int((batch.seq.labels != IGNORE_INDEX).sum()) - 8


def test_training_lowers_the_loss_and_the_reference_stays_stage1(tmp_path, smoke, stage1):
    from pigeon_utils.dpo import dpo_stage, reference_cache
    from pigeon_utils.train import train

    pairs = read_pairs(stage1)
    cfg = dpo_cfg(precompute_ref_log_probs=False, max_steps=10, eval_every=10)
    stage, acc = dpo_stage(cfg, run_cfg(tmp_path, smoke), pairs["train"], pairs["valid"], sft_dir=stage1,
                           backbone=load_smoke(smoke))
    policy = stage.model
    res = train(stage, tmp_path / "dpo", acc, progress=False)
    losses = [e["loss"] for e in res.log["train"]]
    assert len(losses) == 10 and losses[0] == pytest.approx(math.log(2), abs=1e-4)
    # 8 pairs, 4 per step: steps 1-2 and 9-10 each see every training pair once
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.03, losses
    assert sum(e["rewards/accuracies"] for e in res.log["train"][-2:]) / 2 > 0.5
    # a fresh Stage-1 policy: its LoRA equals the reference's, and the cached log-probs it computes equal the
    # ones the trained policy's reference computes now
    fresh, acc2 = dpo_stage(dpo_cfg(), run_cfg(tmp_path, smoke), pairs["train"], pairs["valid"], sft_dir=stage1,
                            backbone=load_smoke(smoke))
    start = lora_state(fresh.model)
    assert policy.reference_state.keys() == start.keys()
    for k, v in start.items():
        assert torch.equal(policy.reference_state[k], v), k
    from safetensors.torch import load_file

    moved = load_file(str(tmp_path / "dpo" / "checkpoint-10" / "lora" / "adapter_model.safetensors"))
    begun = load_file(str(stage1 / "lora" / "adapter_model.safetensors"))
    assert moved.keys() == begun.keys() and any(not torch.equal(moved[k], begun[k]) for k in moved)
    cache = reference_cache(fresh, acc2, tmp_path / "cache", stage1)
    for split, dset, coll in (("train", stage.train_set, stage.train_collate),
                              ("valid", stage.valid_set, stage.valid_collate)):
        batch = coll([dset[i] for i in range(len(dset))])
        now = policy.reference_log_probs(batch).reshape(2, -1).T
        torch.testing.assert_close(now, cache[split], rtol=1e-5, atol=1e-4)


def test_resume_matches_uninterrupted_run(tmp_path, smoke, stage1, monkeypatch):
    from pigeon_utils import dpo
    from pigeon_utils.checkpoints import load_pigeon_model
    from pigeon_utils.train import latest_checkpoint

    pairs = read_pairs(stage1)
    cfg = dpo_cfg()

    def run(name, **kw):
        return dpo.train_dpo(cfg, run_cfg(tmp_path / name, smoke), pairs["train"], pairs["valid"], sft_dir=stage1,
                             backbone=load_smoke(smoke), progress=False, **kw)

    a = run("a")
    b1 = run("b", interrupt_after=3)
    assert b1.steps == 3 and latest_checkpoint(tmp_path / "b" / "dpo").name == "checkpoint-3"
    cache_file = tmp_path / "b" / "dpo" / dpo.REFERENCE_FILE
    mtime = cache_file.stat().st_mtime_ns

    def no_recompute(*args, **kw):
        raise AssertionError("a resumed run recomputed the reference log-probs")

    monkeypatch.setattr(dpo, "_compute", no_recompute)
    b2 = run("b", resume=True)
    assert cache_file.stat().st_mtime_ns == mtime and a.steps == b2.steps == 4
    sa, sb = lora_state(a.model), lora_state(b2.model)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)
    for x, y in zip(a.log["train"], b2.log["train"], strict=True):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    # the validation log: the loss and TRL's metrics; at step 0 the policy is the reference
    v0 = a.log["valid"][0]
    assert set(v0) == {"step", "loss"} | TRL_KEYS and v0["step"] == 0
    assert v0["loss"] == pytest.approx(math.log(2), abs=1e-6) and v0["rewards/chosen"] == v0["rewards/margins"] == 0
    assert [e["step"] for e in a.log["valid"]] == [0, 2, 4] and set(a.log["train"][0]) == {"step", "loss"} | TRL_KEYS
    # files: tensors and JSON only; best/ is a complete model folder
    ck = tmp_path / "a" / "dpo" / "checkpoint-4"
    for f in ("optimizer.pt", "rng_state.pt"):
        torch.load(ck / f, map_location="cpu", weights_only=True)
    for f in ("scheduler.json", "trainer_state.json", "dpo_config.json"):
        json.loads((ck / f).read_text())
    best = load_pigeon_model(load_smoke(smoke), tmp_path / "a" / "dpo" / "best")
    for k, v in lora_state(best).items():
        torch.testing.assert_close(v, sa[k], msg=k)
    assert best.config.lora_dropout == 0.0 and not list((tmp_path / "a" / "dpo").glob(".*tmp*"))


def test_clear_errors(tmp_path, smoke, stage1):
    from pigeon_utils.dpo import DPOConfig, train_dpo

    pairs = read_pairs(stage1)
    run = run_cfg(tmp_path, smoke)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train_dpo(dpo_cfg(), run, pairs["train"], pairs["valid"], sft_dir=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="pairs_train is empty"):
        train_dpo(dpo_cfg(), run, [], pairs["valid"], sft_dir=stage1)
    bad = [{**pairs["train"][0], "chosen": [10**6]}]
    with pytest.raises(ValueError, match=r"train pairs\[0\].chosen"):
        train_dpo(dpo_cfg(), run, bad, pairs["valid"], sft_dir=stage1, backbone=load_smoke(smoke))
    for kw in (dict(loss_type="ipo"), dict(reference_inputs="new"), dict(response_tokens="some"), dict(beta=0)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            DPOConfig(**kw)
    d = DPOConfig()  # the paper's values (docs/algorithm.md §4.5)
    assert (d.lr, d.warmup_steps, d.batch_size, d.eval_every, d.patience, d.save_total_limit, d.beta, d.seed,
            d.max_eval_samples) == (5e-6, 20, 8, 25, 10, 5, 0.1, 123, 200)


# ------------------------------------------------------------------------------------------- data parallel
DDP_SCRIPT = r"""
import json, sys, torch
import pigeon_utils
sys.path.insert(0, {tests!r})
from test_dpo import dpo_cfg, lora_state
from test_sft import load_smoke, run_cfg
from pigeon_utils.dpo import train_dpo
from pathlib import Path
torch.set_num_threads(1)
pairs = json.loads((Path({stage1!r}) / "pairs.json").read_text())
res = train_dpo(dpo_cfg(max_steps=2, eval_every=2), run_cfg(Path({out!r}), Path({smoke!r})), pairs["train"],
                pairs["valid"], sft_dir=Path({stage1!r}), backbone=load_smoke(Path({smoke!r})), progress=False)
import torch.distributed as dist
if not dist.is_initialized() or dist.get_rank() == 0:
    torch.save({{"state": lora_state(res.model), "log": res.log}}, Path({out!r}) / "result.pt")
"""


def test_two_process_data_parallel_matches_single_process(tmp_path, smoke, stage1):
    from pigeon_utils.dpo import train_dpo

    pairs = read_pairs(stage1)
    one = train_dpo(dpo_cfg(max_steps=2, eval_every=2), run_cfg(tmp_path / "one", smoke), pairs["train"],
                    pairs["valid"], sft_dir=stage1, backbone=load_smoke(smoke), progress=False)
    out = tmp_path / "two"
    out.mkdir()
    (out / "train.py").write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), out=str(out), smoke=str(smoke),
                                                    stage1=str(stage1)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", str(out / "train.py")]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-4000:]
    two = torch.load(out / "result.pt", weights_only=True)
    for split in ("train", "valid"):
        for j, (x, y) in enumerate(zip(one.log[split], two["log"][split], strict=True)):
            assert x.keys() == y.keys(), split
            if j == 0:  # policy = reference: the rewards are float noise, and so is which of a pair's is larger
                x, y = ({k: v for k, v in d.items() if k != "rewards/accuracies"} for d in (x, y))
            assert x == pytest.approx(y, rel=1e-4, abs=1e-4), (split, j)
    for k, v in lora_state(one.model).items():
        torch.testing.assert_close(v, two["state"][k], rtol=1e-4, atol=1e-5, msg=k)


def test_stage2_starts_from_the_authors_stage1_checkpoint(tmp_path, smoke, stage1):
    """The same Stage-1 weights written in the authors' layout (checkpoint-N/{mask_generator,adapter,llama}/) give
    the same Stage-2 run as our folder."""
    from test_upstream_checkpoints import write_stage1

    from pigeon_utils.checkpoints import load_pigeon_model
    from pigeon_utils.dpo import train_dpo

    upstream = write_stage1(load_pigeon_model(load_smoke(smoke), stage1), tmp_path / "checkpoint-5")
    pairs = read_pairs(stage1)
    cfg = dpo_cfg(max_steps=2, eval_every=2)
    ours = train_dpo(cfg, run_cfg(tmp_path / "a", smoke), pairs["train"], pairs["valid"], sft_dir=stage1,
                     backbone=load_smoke(smoke), progress=False)
    theirs = train_dpo(cfg, run_cfg(tmp_path / "b", smoke), pairs["train"], pairs["valid"], sft_dir=upstream,
                       backbone=load_smoke(smoke), progress=False)
    assert [e["loss"] for e in ours.log["train"]] == pytest.approx([e["loss"] for e in theirs.log["train"]], rel=1e-5)
    a, b = lora_state(ours.model), lora_state(theirs.model)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
