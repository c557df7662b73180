"""The authors' checkpoint layouts (docs/algorithm.md §3.6, §4.6) load into our model: tiny Stage-1 and Stage-2
folders written from the toy smoke backbone the way the upstream trainers write them, the golden mask-generator and
adapter weights (upstream parameter names), and the errors for folders of another layout."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import pigeon_utils  # noqa: F401
from test_sft import DATA, build_smoke, load_smoke

SMALL = dict(adapter_hidden=16, mask_feedforward=32, lora_r=4, lora_alpha=8)


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> Path:
    return build_smoke(tmp_path_factory.mktemp("toy-smoke-upstream") / "toy")


def small_model(smoke_dir, seed: int, like=None):
    """A PigeonModel on a fresh smoke backbone with random trained parts (LoRA B included, so the LoRA acts);
    `like`: copy the adapter and mask generator of that model (a Stage-2 model shares its Stage-1 parts)."""
    from pigeon_utils.model import PigeonModel, PigeonModelConfig

    model = PigeonModel(load_smoke(smoke_dir), PigeonModelConfig(**SMALL))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or name.startswith(("adapter.", "mask_generator.")):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    if like is not None:
        model.adapter.load_state_dict(like.adapter.state_dict())
        model.mask_generator.load_state_dict(like.mask_generator.state_dict())
    return model.eval()


def write_stage1(model, folder: Path) -> Path:
    """checkpoint-N/{mask_generator,adapter}/pytorch_model.bin + llama/ (peft, .bin), as finetune_sft.py saves."""
    for name, sd in (("mask_generator", model.mask_generator.upstream_state_dict()),
                     ("adapter", model.adapter.state_dict())):
        (folder / name).mkdir(parents=True)
        torch.save({k: v.detach().clone() for k, v in sd.items()}, folder / name / "pytorch_model.bin")
    model.lmm.save_pretrained(str(folder / "llama"), safe_serialization=False)
    return folder


def write_stage2(model, folder: Path) -> Path:
    """checkpoint-N/llama/policy/ (peft, safetensors), as finetune_dpo.py saves: the policy LoRA only."""
    model.lmm.save_pretrained(str(folder / "llama" / "policy"), safe_serialization=True)
    return folder


def state(model) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.detach().clone() for part, sd in model.trainable_state().items() for k, v in sd.items()}


def assert_same_model(a, b):
    """Same trained weights, and the same outputs: the Stage-1 loss and the sweep's inference inputs on a batch."""
    from pigeon_utils.batching import ImageTokenCache, PigeonCollator, PromptDataset
    from pigeon_utils.data import open_dataset

    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    ds = open_dataset(DATA, "movie")
    sset = PromptDataset(ds, "train", a.backbone, max_samples=3)
    batch = PigeonCollator(ImageTokenCache(ds, a.backbone.tokenizer), a.backbone.layout, seed=0)(
        [sset[i] for i in range(3)])
    with torch.no_grad():
        assert torch.equal(a(batch, 0.4).loss_sum, b(batch, 0.4).loss_sum)
        for x, y in zip(a.sweep_embeddings(batch, [0.0, 0.5, 1.0]), b.sweep_embeddings(batch, [0.0, 0.5, 1.0])):
            assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------------- loading
def test_stage1_folder_loads_the_weights_written(tmp_path, smoke_dir):
    from pigeon_utils.checkpoints import find_upstream_checkpoint, load_upstream_model

    a = small_model(smoke_dir, 1)
    folder = write_stage1(a, tmp_path / "checkpoint-10")
    assert (folder / "llama" / "adapter_model.bin").is_file()
    assert find_upstream_checkpoint(folder).stage == 1
    b = load_upstream_model(load_smoke(smoke_dir), folder)
    assert not b.training
    assert b.config.adapter_hidden == 16 and b.config.mask_feedforward == 32 and b.config.lora_r == 4
    # the released 257-row position table was written; ours (259 rows) is kept
    assert torch.load(folder / "mask_generator" / "pytorch_model.bin",
                      weights_only=True)["position_embedding.pe"].shape[0] == 257
    assert_same_model(a, b)


def test_stage2_folder_takes_policy_lora_and_stage1_parts(tmp_path, smoke_dir):
    from pigeon_utils.checkpoints import find_upstream_checkpoint, load_upstream_model

    s1 = small_model(smoke_dir, 1)
    stage1 = write_stage1(s1, tmp_path / "sft" / "checkpoint-2975")
    s2 = small_model(smoke_dir, 2, like=s1)  # other LoRA, the Stage-1 adapter and mask generator
    stage2 = write_stage2(s2, tmp_path / "dpo" / "checkpoint-375")
    ckpt = find_upstream_checkpoint(stage2, stage1)
    assert ckpt.stage == 2 and ckpt.lora_file.name == "adapter_model.safetensors"
    b = load_upstream_model(load_smoke(smoke_dir), stage2, stage1_dir=stage1)
    assert_same_model(s2, b)


def test_load_any_model_reads_ours_and_upstream(tmp_path, smoke_dir):
    from pigeon_utils.checkpoints import load_any_model

    a = small_model(smoke_dir, 3)
    ours = a.save_pretrained(tmp_path / "best")
    upstream = write_stage1(a, tmp_path / "checkpoint-1")
    assert_same_model(a, load_any_model(load_smoke(smoke_dir), ours))
    assert_same_model(a, load_any_model(load_smoke(smoke_dir), upstream))


def test_given_config_is_checked_against_the_files(tmp_path, smoke_dir):
    from pigeon_utils.checkpoints import load_upstream_model
    from pigeon_utils.model import PigeonModelConfig

    folder = write_stage1(small_model(smoke_dir, 4), tmp_path / "checkpoint-1")
    b = load_upstream_model(load_smoke(smoke_dir), folder, config=PigeonModelConfig(**SMALL, adapter_dropout=0.0))
    assert b.config.adapter_dropout == 0.0
    with pytest.raises(ValueError, match=r"lora_r = 4 in the files, 8 in the config"):
        load_upstream_model(load_smoke(smoke_dir), folder, config=PigeonModelConfig(**{**SMALL, "lora_r": 8}))


@pytest.mark.shared
def test_golden_weights_carry_our_names(tmp_path, golden_dir):
    """The golden mask generator and adapter (written with the upstream classes) in a Stage-1 folder: the config is
    read from their shapes, and they load strictly into our modules, the 257-row position table included."""
    import json

    from safetensors.torch import load_file

    from pigeon_utils.adapter import PigeonAdapter
    from pigeon_utils.checkpoints import find_upstream_checkpoint, read_upstream_weights, upstream_model_config

    folder = tmp_path / "checkpoint-1"
    golden = {}
    for name, fixture in (("mask_generator", "mask_generator"), ("adapter", "pigeon_adapter")):
        golden[name] = load_file(str(golden_dir / f"{fixture}.weights.safetensors"))
        (folder / name).mkdir(parents=True)
        torch.save(golden[name], folder / name / "pytorch_model.bin")
    (folder / "llama").mkdir()
    (folder / "llama" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "bias": "none",
         "target_modules": ["v_proj", "q_proj"]}))
    (folder / "llama" / "adapter_model.bin").write_bytes(b"")
    ckpt = find_upstream_checkpoint(folder)
    cfg = upstream_model_config(ckpt)
    assert (cfg.adapter_hidden, cfg.mask_feedforward, cfg.mask_layers, cfg.lora_r) == (16, 2048, 1, 8)
    gen = cfg.build_mask_generator(64)
    gen.load_state_dict(read_upstream_weights(ckpt.mask_generator_file), strict=True)
    adapter = PigeonAdapter(64, cfg.adapter_hidden, 64)
    adapter.load_state_dict(read_upstream_weights(ckpt.adapter_file), strict=True)
    for module, name in ((gen, "mask_generator"), (adapter, "adapter")):
        for k, v in module.state_dict().items():
            if k == "position_embedding.pe":
                assert v.shape[0] == 259
                torch.testing.assert_close(v[:257], golden[name][k], atol=1e-4, rtol=0)
            else:
                assert torch.equal(v, golden[name][k]), k


# ------------------------------------------------------------------------------------------------- errors
def test_wrong_layouts_name_the_missing_file_and_both_layouts(tmp_path, smoke_dir):
    from pigeon_utils.checkpoints import UpstreamLayoutError, find_upstream_checkpoint, load_any_model

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UpstreamLayoutError) as e:
        find_upstream_checkpoint(empty)
    msg = str(e.value)
    assert "llama/adapter_config.json (Stage 1)" in msg and "Stage 2 (finetune_dpo.py)" in msg
    assert "Stage 1 (finetune_sft.py)" in msg
    with pytest.raises(UpstreamLayoutError, match="pigeon_model.json"):
        load_any_model(load_smoke(smoke_dir), empty)

    a = small_model(smoke_dir, 5)
    good = write_stage1(a, tmp_path / "good")
    for rel, expect in (("adapter/pytorch_model.bin", "adapter/pytorch_model.bin"),
                        ("mask_generator/pytorch_model.bin", "mask_generator/pytorch_model.bin"),
                        ("llama/adapter_model.bin", "adapter_model.safetensors or adapter_model.bin"),
                        ("llama/adapter_config.json", "llama/adapter_config.json")):
        bad = tmp_path / rel.replace("/", "_")
        shutil.copytree(good, bad)
        (bad / rel).unlink()
        with pytest.raises(UpstreamLayoutError) as e:
            find_upstream_checkpoint(bad)
        assert expect in str(e.value) and "the Stage-1 layout was expected" in str(e.value)
        assert "Stage 2 (finetune_dpo.py)" in str(e.value)

    stage2 = write_stage2(a, tmp_path / "dpo")
    with pytest.raises(UpstreamLayoutError, match="stage1_dir"):
        find_upstream_checkpoint(stage2)
    no_gen = tmp_path / "mask_generator_pytorch_model.bin"  # the Stage-1 copy without its mask generator
    with pytest.raises(UpstreamLayoutError, match="mask_generator/pytorch_model.bin"):
        find_upstream_checkpoint(stage2, no_gen)


def test_damaged_or_foreign_weights_are_named(tmp_path, smoke_dir):
    from pigeon_utils.checkpoints import load_upstream_model

    a = small_model(smoke_dir, 6)
    folder = write_stage1(a, tmp_path / "checkpoint-1")
    path = folder / "adapter" / "pytorch_model.bin"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"adapter/pytorch_model.bin: not a readable weights file"):
        load_upstream_model(load_smoke(smoke_dir), folder)
    sd = {k: v.clone() for k, v in a.adapter.state_dict().items()}
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"(?s)does not fit the model's adapter .*extra.weight"):
        load_upstream_model(load_smoke(smoke_dir), folder)
    torch.save(a.adapter.state_dict(), path)
    lora = torch.load(folder / "llama" / "adapter_model.bin", weights_only=True)
    torch.save({k.replace("q_proj", "k_proj"): v for k, v in lora.items()}, folder / "llama" / "adapter_model.bin")
    with pytest.raises(ValueError, match="LoRA keys differ from the model's"):
        load_upstream_model(load_smoke(smoke_dir), folder)
