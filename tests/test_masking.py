"""Tests of pigeon_utils.masking (the mutual mask generator) and pigeon_utils.keep (keep decisions): golden
fixture (skipped without ../shared; every size, ratio and tolerance read from its config.json and tensors) and
behaviour tests."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

import pigeon_utils  # noqa: F401  (import order: before any transformers/diffusers import)
from pigeon_utils.keep import (
    HIST_TYPE,
    TARGET_TYPE,
    generate_keep_mask,
    gumbel_topk_keep,
    keep_count,
    keep_probabilities,
    layout_from_counts,
    random_mask_count,
)
from pigeon_utils.masking import (
    DEFAULT_POSITION_ROWS,
    UPSTREAM_POSITION_ROWS,
    MutualMaskGenerator,
    sinusoidal_table,
)

ATOL = 1e-5  # behaviour tests (the golden tests read theirs from config.json)


def _close(actual, expected, atol=ATOL, rtol=1e-5):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def parse_keys_file(path):
    """keys_pigeon_extra.txt → {section: {name: shape}} (sections start with '# <section> (...)')."""
    sections, current = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            current = sections.setdefault(line[1:].split()[0], {})
        elif line.strip():
            name, shape = line.split("\t")
            current[name] = [int(x) for x in shape.strip("[]").split(",")]
    return sections


# ---------------------------------------------------------------------------------------------------------
# golden fixture
# ---------------------------------------------------------------------------------------------------------
class Golden:
    """The mask_generator fixture: its config.json entry, tensors, weights and the generator built from them."""

    def __init__(self, golden_dir):
        from safetensors.torch import load_file

        self.meta = json.loads((golden_dir / "config.json").read_text())["fixtures"]["mask_generator"]
        self.io = load_file(str(golden_dir / "mask_generator.io.safetensors"))
        self.weights = load_file(str(golden_dir / "mask_generator.weights.safetensors"))
        described = self.meta["io"]["tensors"]
        assert set(self.io) == set(described)
        assert all(list(self.io[k].shape) == v["shape"] for k, v in described.items())
        self.constructor = dict(self.meta["constructor"])
        self.dim_feedforward = self.meta["implied"]["nn.TransformerEncoderLayer"]["dim_feedforward"]
        rec = self.meta["tolerance"]["recommended"]
        self.tol = dict(atol=float(rec["atol"]), rtol=float(rec["rtol"]))
        args = self.meta["forward_args"]
        self.ref_mask_ratio, self.hist_mask_ratio, self.tau = args["mask_ratio"], args["hist_mask_ratio"], args["tau"]

    def generator(self, **overrides) -> MutualMaskGenerator:
        kw = dict(self.constructor, dim_feedforward=self.dim_feedforward, **overrides)
        return MutualMaskGenerator(**kw)


@pytest.fixture(scope="module")
def golden(golden_dir):
    g = Golden(golden_dir)
    torch.manual_seed(0)
    gen = g.generator()
    result = gen.load_state_dict(g.weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return gen.eval(), g


def _run(gen, g, *, inference, noise=True, straight_through=True):
    io = g.io
    ones = torch.ones_like(io["gumbel_exponential_hist"])
    return gen(io["token_embeds"], io["attention_mask"], io["position_ids"], io["type_ids"],
               ref_mask_ratio=g.ref_mask_ratio, hist_mask_ratio=g.hist_mask_ratio, tau=g.tau, inference=inference,
               straight_through=straight_through,
               hist_exponential=io["gumbel_exponential_hist"] if noise else ones,
               target_exponential=io["gumbel_exponential_target"] if noise else ones)


def test_golden_scores_and_probabilities(golden):
    gen, g = golden
    io, tol = g.io, g.tol
    valid = ~io["attention_mask"]
    target = io["type_ids"] == TARGET_TYPE
    with torch.no_grad():
        out = _run(gen, g, inference=True)
        train = _run(gen, g, inference=False)
    s = out.scores
    _close(s.input_embeds, io["input_embeds"], **tol)
    _close(s.output_embeds[valid], io["output_embeds"][valid], **tol)
    _close(s.output_embeds[valid], io["output_embeds_no_fastpath"][valid], **tol)
    _close(s.cos_sim[valid], io["cos_sim"][valid], **tol)
    assert torch.all(s.output_embeds[~valid] == 0) and torch.all(s.cos_sim[~valid] == 0)
    _close(out.hist_keep_prob, io["hist_keep_prob"], **tol)
    _close(out.target_keep_prob, io["target_keep_prob_inference"], **tol)
    _close(train.target_keep_prob[target], io["target_keep_prob_training"][target], **tol)
    assert torch.all(train.target_keep_prob[~target] == 0)


@pytest.mark.parametrize("inference", [True, False], ids=["inference", "training"])
@pytest.mark.parametrize("noise", [True, False], ids=["gumbel", "no_noise"])
@pytest.mark.parametrize("straight_through", [True, False], ids=["st", "reference"])
def test_golden_keep_decisions(golden, inference, noise, straight_through):
    gen, g = golden
    io = g.io
    name = "keep_decision_" + ("inference" if inference else "training") + ("" if noise else "_no_noise")
    out = _run(gen, g, inference=inference, noise=noise, straight_through=straight_through)
    expected = io[name] != 0
    assert torch.equal(out.hard, expected)
    assert torch.equal(out.keep.detach(), expected.float())  # forward value exactly 0/1
    # k = max(1, int(n (1 - r))) per row, n = the group sizes that config.json's sequence layout records.
    layout = g.meta["sequence_layout"]
    n_hist = [sum(row) for row in layout["history_token_counts"]]
    n_target = layout["target_token_counts"]
    assert (io["type_ids"] == HIST_TYPE).sum(-1).tolist() == n_hist
    assert (io["type_ids"] == TARGET_TYPE).sum(-1).tolist() == n_target
    assert out.hist_keep_count.tolist() == [max(1, int(n * (1 - g.hist_mask_ratio))) for n in n_hist]
    assert out.target_keep_count.tolist() == [max(1, int(n * (1 - g.ref_mask_ratio))) for n in n_target]
    assert (out.hard & (io["type_ids"] == HIST_TYPE)).sum(-1).tolist() == out.hist_keep_count.tolist()
    assert (out.hard & (io["type_ids"] == TARGET_TYPE)).sum(-1).tolist() == out.target_keep_count.tolist()


def test_golden_training_flip_visible_without_noise(golden):
    gen, g = golden
    with torch.no_grad():
        inf = _run(gen, g, inference=True, noise=False).hard
        train = _run(gen, g, inference=False, noise=False).hard
    target = g.io["type_ids"] == TARGET_TYPE
    assert torch.equal(inf & ~target, train & ~target)
    assert not torch.equal(inf & target, train & target)


def test_golden_position_table_upstream_rows(golden):
    gen, g = golden
    weights = g.weights
    stored = weights["position_embedding.pe"]
    assert stored.shape[0] == g.meta["implied"]["PositionalEncoding"]["max_len"] == UPSTREAM_POSITION_ROWS
    pe = gen.position_embedding.pe
    assert pe.shape[0] == DEFAULT_POSITION_ROWS  # the stored 257 rows were checked and extended
    torch.testing.assert_close(pe[:UPSTREAM_POSITION_ROWS], stored, atol=1e-4, rtol=0)
    up = gen.upstream_state_dict()
    assert set(up) == set(weights) and all(up[k].shape == weights[k].shape for k in weights)
    # an upstream-sized model loads the file as stored
    small = g.generator(max_positions=UPSTREAM_POSITION_ROWS)
    small.load_state_dict(weights, strict=True)
    assert torch.equal(small.position_embedding.pe, stored)
    # a table that is not the sinusoid is refused, naming the key
    bad = dict(weights)
    bad["position_embedding.pe"] = stored.flip(0)
    with pytest.raises(ValueError, match="position_embedding.pe"):
        g.generator().load_state_dict(bad, strict=True)


def test_full_size_state_dict_matches_keys_file(shared_dir):
    keys = parse_keys_file(shared_dir / "spec" / "keys" / "keys_pigeon_extra.txt")["mask_generator"]
    with torch.device("meta"):
        upstream_sized = MutualMaskGenerator(4096, num_heads=4, num_layers=1,
                                             max_positions=UPSTREAM_POSITION_ROWS)
        ours = MutualMaskGenerator(4096)
    for model, pe_rows in ((upstream_sized, 257), (ours, DEFAULT_POSITION_ROWS)):
        sd = model.state_dict()
        assert list(sd) == list(keys)
        expected = dict(keys, **{"position_embedding.pe": [pe_rows, 4096]})
        assert {k: list(v.shape) for k, v in sd.items()} == expected
    assert sum(p.numel() for p in ours.parameters()) + 257 * 4096 == 101_779_456


# ---------------------------------------------------------------------------------------------------------
# keep counts
# ---------------------------------------------------------------------------------------------------------
def test_keep_count_replicates_python_int():
    # 1 - 0.9 = 0.09999999999999998 in doubles, so 20 * (1 - 0.9) = 1.9999999999999996 → int → 1, not 2.
    assert keep_count(torch.tensor([20]), 0.9).item() == 1 == max(1, int(20 * (1 - 0.9)))
    ns = torch.arange(0, 600)
    for r in [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0, 1 / 3, 0.123456789, random.Random(0).random()]:
        expected = [0 if n == 0 else max(1, int(n * (1 - r))) for n in ns.tolist()]
        assert keep_count(ns, r).tolist() == expected, r
        assert random_mask_count(ns, r).tolist() == [math.ceil(n * r) for n in ns.tolist()], r


def _random_layout(rng: random.Random, batch: int, images: int = 6, lo: int = 0, hi: int = 12):
    counts = torch.tensor([[rng.randint(lo, hi) for _ in range(images)] for _ in range(batch)])
    counts[:, -1].clamp_(min=1)  # a target image always has at least one token
    return counts


def test_gumbel_topk_counts_over_random_layouts():
    rng = random.Random(1234)
    gen = torch.Generator().manual_seed(7)
    ratios = [0.0, 1.0, 0.1, 0.2, 0.5, 0.7, 0.9] + [rng.random() for _ in range(8)]
    for trial in range(24):
        counts = _random_layout(rng, batch=rng.randint(1, 9))
        pos, types, pad = layout_from_counts(counts)
        cos = torch.rand(types.shape, generator=gen) * 2 - 1
        hq, tq = keep_probabilities(cos, types, inference=bool(trial % 2))
        for r in ratios:
            for q, group_type in ((hq, 1), (tq, 2)):
                group = types == group_type
                keep, k = gumbel_topk_keep(q, group, r, generator=gen, straight_through=bool(trial % 3))
                hard = keep.detach() != 0
                assert not hard[pad].any()
                assert not hard[~group].any()
                n = group.sum(-1).tolist()
                expected = [0 if m == 0 else max(1, int(m * (1 - r))) for m in n]
                assert hard.sum(-1).tolist() == expected == k.tolist(), (r, n)
                assert torch.equal(keep.detach(), hard.float())


def _loop_reference(q, group, ratio, exponential):
    """Per-row, per-group rule written as a plain loop (upstream's formulation, independent of ours)."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        idx = group[b].nonzero().flatten()
        if len(idx) == 0:
            continue
        k = max(1, int(len(idx) * (1 - ratio)))
        z = q[b, idx].log() - exponential[b, idx].log()
        out[b, idx[torch.topk(z, k).indices]] = 1.0
    return out


def test_vectorised_selection_equals_per_row_loop():
    gen = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    for _ in range(20):
        counts = _random_layout(rng, batch=6, lo=0, hi=40)
        _, types, _ = layout_from_counts(counts)
        cos = torch.rand(types.shape, generator=gen) * 2 - 1
        e = torch.empty(types.shape).exponential_(generator=gen)
        for inference in (True, False):
            hq, tq = keep_probabilities(cos, types, inference=inference)
            for q, g, r in ((hq, types == 1, 0.2), (tq, types == 2, rng.random())):
                keep, _ = gumbel_topk_keep(q, g, r, exponential=e)
                assert torch.equal(keep.detach(), _loop_reference(q, g, r, e))


# ---------------------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------------------
def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return MutualMaskGenerator(16, num_heads=2, dim_feedforward=32, **kw)


def _inputs(counts, dim=16, seed=0):
    pos, types, pad = layout_from_counts(counts)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(*types.shape, dim, generator=g)
    return emb, pad, pos, types


def test_generator_counts_and_padding_over_random_layouts():
    gen = _tiny().eval()
    rng = random.Random(5)
    for _ in range(6):
        counts = _random_layout(rng, batch=5, lo=0, hi=15)
        emb, pad, pos, types = _inputs(counts, seed=rng.randint(0, 99))
        for rh, rr in ((0.2, 0.0), (0.0, 1.0), (1.0, 0.5), (rng.random(), rng.random())):
            out = gen(emb, pad, pos, types, ref_mask_ratio=rr, hist_mask_ratio=rh, inference=False,
                      generator=torch.Generator().manual_seed(1))
            hard = out.hard
            assert not hard[pad].any()
            nh, nt = (types == 1).sum(-1).tolist(), (types == 2).sum(-1).tolist()
            assert (hard & (types == 1)).sum(-1).tolist() == [0 if n == 0 else max(1, int(n * (1 - rh))) for n in nh]
            assert (hard & (types == 2)).sum(-1).tolist() == [max(1, int(n * (1 - rr))) for n in nt]


def test_padding_does_not_influence_anything():
    gen = _tiny().eval()
    counts = torch.tensor([[3, 4, 0, 2, 5, 6], [1, 1, 1, 1, 1, 2], [8, 8, 8, 8, 8, 9]])
    emb, pad, pos, types = _inputs(counts)
    e = torch.empty(types.shape).exponential_(generator=torch.Generator().manual_seed(2))
    kw = dict(ref_mask_ratio=0.4, hist_mask_ratio=0.2, inference=True)
    ref = gen(emb, pad, pos, types, hist_exponential=e, target_exponential=e, **kw)
    # different pad embeddings and 5 more padding columns
    extra = 5
    emb2 = torch.cat([emb.masked_fill(pad[..., None], 0.0) + 100 * pad[..., None], torch.randn(3, extra, 16)], 1)
    cat = lambda t, v: torch.cat([t, torch.full((3, extra), v, dtype=t.dtype)], 1)  # noqa: E731
    e2 = torch.cat([e, torch.rand(3, extra)], 1)
    out = gen(emb2, cat(pad, True), cat(pos, 0), cat(types, 0), hist_exponential=e2, target_exponential=e2, **kw)
    valid = ~pad
    _close(out.scores.output_embeds[:, :-extra][valid], ref.scores.output_embeds[valid])
    _close(out.scores.cos_sim[:, :-extra], ref.scores.cos_sim)
    assert torch.equal(out.keep[:, :-extra], ref.keep) and not out.hard[:, -extra:].any()


def test_positions_reach_258_with_default_table():
    """Spec §2.2 bug: a 256-token target plus [IMG]/[/IMG] has positions up to 258."""
    counts = torch.tensor([[2, 2, 2, 2, 2, 258]])
    emb, pad, pos, types = _inputs(counts)
    assert pos.max().item() == 258
    out = _tiny().eval()(emb, pad, pos, types, ref_mask_ratio=0.5)
    assert out.target_keep_count.item() == 129
    with pytest.raises(IndexError, match="max_positions >= 259"):
        _tiny(max_positions=UPSTREAM_POSITION_ROWS)(emb, pad, pos, types, ref_mask_ratio=0.5)


def _loss(gen, straight_through, counts=None):
    counts = torch.tensor([[4, 3, 5, 2, 6, 7], [2, 2, 2, 2, 2, 1], [0, 0, 0, 0, 0, 3]]) if counts is None else counts
    emb, pad, pos, types = _inputs(counts)
    emb.requires_grad_(True)
    out = gen(emb, pad, pos, types, ref_mask_ratio=0.5, hist_mask_ratio=0.2, inference=False,
              straight_through=straight_through, generator=torch.Generator().manual_seed(0))
    w = torch.randn(emb.shape, generator=torch.Generator().manual_seed(9))
    return (emb * out.keep.unsqueeze(-1) * w).sum(), out  # masked tokens → zero vectors, as the model does


def test_gradients_reach_generator_in_straight_through_mode():
    gen = _tiny().train()
    loss, out = _loss(gen, True)
    loss.backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for name in ("dense.weight", "type_embedding.weight", "LayerNorm.weight",
                 "encoder.layers.0.self_attn.in_proj_weight"):
        assert dict(gen.named_parameters())[name].grad.abs().sum() > 0, name


def test_no_gradient_in_reference_mode():
    gen = _tiny().train()
    loss, out = _loss(gen, False)
    assert out.keep.grad_fn is None and not out.keep.requires_grad
    assert not out.scores.cos_sim.requires_grad  # the scorer ran without autograd (frozen generator)
    loss.backward()  # the loss still depends on the (trainable) embeddings
    assert all(p.grad is None for p in gen.parameters())


def test_straight_through_forward_value_is_hard_mask():
    gen = _tiny().eval()
    _, st = _loss(gen, True)
    _, ref = _loss(gen, False)
    assert torch.equal(st.keep.detach(), ref.keep)
    assert set(st.keep.detach().unique().tolist()) <= {0.0, 1.0}


def test_single_target_token_in_training_is_kept_without_nan():
    # one target token: 1 - softmax = 0 → log 0; upstream gives NaN here.
    counts = torch.tensor([[3, 3, 3, 3, 3, 1], [2, 2, 2, 2, 2, 4]])
    gen = _tiny().train()
    loss, out = _loss(gen, True, counts)
    assert out.hard[0, 15] and torch.isfinite(out.keep).all()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters())


def test_same_seed_same_mask_different_seed_different_mask():
    gen = _tiny().eval()
    counts = torch.tensor([[30, 25, 40, 35, 28, 60]] * 4)
    emb, pad, pos, types = _inputs(counts)

    def run(seed):
        return gen(emb, pad, pos, types, ref_mask_ratio=0.5, generator=torch.Generator().manual_seed(seed)).hard

    assert torch.equal(run(11), run(11))
    assert not torch.equal(run(11), run(12))
    e = torch.empty(types.shape).exponential_(generator=torch.Generator().manual_seed(5))
    injected = [gen(emb, pad, pos, types, ref_mask_ratio=0.5, hist_exponential=e, target_exponential=e,
                    generator=torch.Generator().manual_seed(s)).hard for s in (1, 2)]
    assert torch.equal(*injected)  # injected noise overrides the generator


# ---------------------------------------------------------------------------------------------------------
# other mask types, entry point, helpers, errors
# ---------------------------------------------------------------------------------------------------------
def test_random_mask_type():
    counts = torch.tensor([[5, 6, 7, 8, 9, 10], [1, 1, 1, 1, 1, 3], [4, 0, 4, 0, 4, 37]])
    pos, types, pad = layout_from_counts(counts)
    for r in (0.0, 0.1, 0.5, 0.99, 1.0):
        out = generate_keep_mask("random", type_ids=types, padding_mask=pad, ref_mask_ratio=r,
                                 hist_mask_ratio=0.9, generator=torch.Generator().manual_seed(0))
        hard = out.hard
        assert torch.equal(hard & (types == 1), types == 1)  # history never masked
        assert not hard[pad].any()
        kept_t = (hard & (types == 2)).sum(-1).tolist()
        assert kept_t == [n - math.ceil(n * r) for n in counts[:, -1].tolist()] == out.target_keep_count.tolist()
    a, b, c = (generate_keep_mask("random", type_ids=types, padding_mask=pad, ref_mask_ratio=0.5,
                                  generator=torch.Generator().manual_seed(s)).keep for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per-sample noise (what a sweep passes): a sample's mask does not depend on its batch, and grows with α_r
    e = torch.empty(types.shape).exponential_(generator=torch.Generator().manual_seed(3))
    keep = {r: generate_keep_mask("random", type_ids=types, padding_mask=pad, ref_mask_ratio=r, target_exponential=e,
                                  generator=torch.Generator().manual_seed(9)).hard for r in (0.2, 0.5, 0.8)}
    p1, t1, d1 = layout_from_counts(counts[1:2])
    alone = generate_keep_mask("random", type_ids=t1, padding_mask=d1, ref_mask_ratio=0.5,
                               target_exponential=e[1:2, :t1.shape[1]]).hard
    assert torch.equal(alone, keep[0.5][1:2, :t1.shape[1]])
    assert bool((keep[0.8] <= keep[0.5]).all() and (keep[0.5] <= keep[0.2]).all())  # masked sets nested across α_r
    kept_t = (keep[0.5] & (types == 2)).sum(-1).tolist()
    assert kept_t == [n - math.ceil(n * 0.5) for n in counts[:, -1].tolist()]
    reversed_noise = generate_keep_mask("random", type_ids=types, padding_mask=pad, ref_mask_ratio=0.5,
                                        target_exponential=1 / e).hard
    assert not torch.equal(reversed_noise, keep[0.5])  # the noise, not the generator, picks the tokens


def test_none_mask_type_and_mutual_entry_point():
    counts = torch.tensor([[2, 3, 0, 1, 2, 4], [1, 1, 1, 1, 1, 1]])
    emb, pad, pos, types = _inputs(counts)
    out = generate_keep_mask("none", type_ids=types, padding_mask=pad, ref_mask_ratio=0.7)
    assert torch.equal(out.keep, (~pad).float())
    gen = _tiny().eval()
    e = torch.rand(types.shape) + 0.1
    direct = gen(emb, pad, pos, types, ref_mask_ratio=0.3, hist_mask_ratio=0.2, hist_exponential=e,
                 target_exponential=e)
    via = generate_keep_mask("mutual", type_ids=types, padding_mask=pad, ref_mask_ratio=0.3, hist_mask_ratio=0.2,
                             mask_generator=gen, token_embeds=emb, position_ids=pos, hist_exponential=e,
                             target_exponential=e)
    assert torch.equal(direct.keep, via.keep)
    with pytest.raises(ValueError, match="mask_generator, token_embeds"):
        generate_keep_mask("mutual", type_ids=types, padding_mask=pad, ref_mask_ratio=0.3)
    with pytest.raises(ValueError, match="'learned'"):
        generate_keep_mask("learned", type_ids=types, padding_mask=pad)


def test_layout_from_counts():
    pos, types, pad = layout_from_counts(torch.tensor([[2, 0, 1, 3], [1, 1, 1, 1]]))
    assert pos.tolist() == [[1, 2, 1, 1, 2, 3], [1, 1, 1, 1, 0, 0]]
    assert types.tolist() == [[1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 0, 0]]
    assert pad.tolist() == [[False] * 6, [False] * 4 + [True] * 2]


@pytest.mark.parametrize("kw, match", [
    (dict(ref_mask_ratio=1.5), "ref_mask_ratio must lie in \\[0, 1\\], got 1.5"),
    (dict(ref_mask_ratio=0.5, hist_mask_ratio=-0.1), "hist_mask_ratio must lie in \\[0, 1\\], got -0.1"),
    (dict(ref_mask_ratio=float("nan")), "ref_mask_ratio must lie in \\[0, 1\\], got nan"),
    (dict(ref_mask_ratio=0.5, tau=0.0), "tau"),
])
def test_bad_arguments_are_named(kw, match):
    counts = torch.tensor([[2, 2, 2, 2, 2, 3]])
    emb, pad, pos, types = _inputs(counts)
    with pytest.raises(ValueError, match=match):
        _tiny()(emb, pad, pos, types, **kw)


def test_inconsistent_layout_and_constructor_errors():
    counts = torch.tensor([[2, 2, 2, 2, 2, 3], [1, 1, 1, 1, 1, 1]])
    emb, pad, pos, types = _inputs(counts)
    with pytest.raises(ValueError, match="disagree"):
        _tiny()(emb, ~pad, pos, types, ref_mask_ratio=0.5)
    with pytest.raises(ValueError, match="num_heads"):
        MutualMaskGenerator(16, num_heads=3)
    with pytest.raises(ValueError, match="emb_dim"):
        MutualMaskGenerator(15, num_heads=1)
    with pytest.raises(ValueError, match="max_positions"):
        MutualMaskGenerator(16, num_heads=2, max_positions=1)


def test_sinusoidal_table_formula():
    t = sinusoidal_table(5, 4)
    p = torch.arange(5.0)[:, None]
    w = torch.tensor([1.0, 10000.0 ** -0.5])
    expected = torch.stack([torch.sin(p * w[0]), torch.cos(p * w[0]), torch.sin(p * w[1]), torch.cos(p * w[1])], -1)
    torch.testing.assert_close(t, expected.squeeze(1))
