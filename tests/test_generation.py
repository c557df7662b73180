"""Generation and the α_r sweep (docs/algorithm.md §5): the shared-prefix sweep equals separate runs, sampling limits,
deterministic and resumable sweeps with atomic files.

The backbone is the toy smoke build (seconds); the Pigeon model is freshly initialised from a fixed seed (no
training is needed to check the mechanics).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import pigeon_utils  # noqa: F401
from test_sft import DATA, build_smoke, load_smoke


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from pigeon_utils.data import open_dataset
    from pigeon_utils.model import PigeonModel, PigeonModelConfig

    bb = load_smoke(build_smoke(tmp_path_factory.mktemp("toy-smoke-inf") / "toy"))
    torch.manual_seed(0)
    model = PigeonModel(bb, PigeonModelConfig(adapter_hidden=16, mask_feedforward=32)).eval()
    return model, open_dataset(DATA, "movie")


def _batch(model, ds, ks, seed=0):
    from pigeon_utils.batching import ImageTokenCache, prompt_batch

    samples = ds.samples("test")
    return prompt_batch(ds, [samples[k] for k in ks], ks, model.backbone,
                        ImageTokenCache(ds, model.backbone.tokenizer, seed=seed), seed)


def test_shared_prefix_equals_full_prompt_per_ratio(world):
    from pigeon_utils.generation import prefill

    model, ds = world
    batch = _batch(model, ds, [0, 1, 2])
    ratios = [0.0, 0.4, 1.0]
    logits, _, _, _ = prefill(model, batch, ratios)
    keep = model.sweep_keep(batch.masks, ratios, noise=batch.noise)
    hist = batch.masks.type_ids == 1
    with torch.no_grad():
        for j, r in enumerate(ratios):
            x, km = model.input_embeddings(batch, r, inference=True)
            assert torch.equal(keep[j], km.keep)  # one scoring pass gives the per-ratio masks
            assert torch.equal(keep[j][hist], keep[0][hist])  # the history mask does not change with α_r
            full = model.lmm(inputs_embeds=x, attention_mask=batch.seq.attention_mask,
                             position_ids=batch.seq.position_ids).logits[:, -1]
            torch.testing.assert_close(logits[j::len(ratios)], full, rtol=1e-4, atol=1e-5)
    # the reference keeps fewer tokens as α_r grows
    n_ref = (keep * (batch.masks.type_ids == 2)).sum(-1)
    assert bool((n_ref[0] >= n_ref[1]).all() and (n_ref[1] >= n_ref[2]).all()) and bool((n_ref[0] > n_ref[2]).any())


@pytest.mark.parametrize("num_beams", [1, 4])
def test_sweep_equals_separate_runs_and_respects_limits(world, num_beams):
    from pigeon_utils.generation import SamplingConfig, generate_tokens

    model, ds = world
    batch = _batch(model, ds, [0, 1, 2])
    ratios = [0.0, 0.5, 1.0]
    sc = SamplingConfig(min_new_tokens=3, max_new_tokens=6, num_beams=num_beams)
    sweep = generate_tokens(model, batch, ratios, sc, seed=5)
    for j, r in enumerate(ratios):
        alone = generate_tokens(model, batch, [r], sc, seed=5, share_prefix=False)
        assert all(torch.equal(sweep[b][j], alone[b][0]) for b in range(3)), r
    # a sample's tokens do not depend on the batch it is in; another seed gives other tokens
    single = generate_tokens(model, _batch(model, ds, [1]), ratios, sc, seed=5)
    assert all(torch.equal(single[0][j], sweep[1][j]) for j in range(3))
    other = generate_tokens(model, batch, ratios, sc, seed=6)
    assert any(not torch.equal(other[b][j], sweep[b][j]) for b in range(3) for j in range(3))
    lengths = [len(c) for row in sweep for c in row]
    assert min(lengths) >= 3 and max(lengths) <= 6
    codebook = model.layout.codebook_size
    assert all(int(c.min()) >= 0 and int(c.max()) < codebook for row in sweep for c in row)


def test_sampling_filters_and_bad_values():
    from pigeon_utils.generation import SamplingConfig
    from pigeon_utils.sampling import filter_logits, sample_inverse_cdf
    from pigeon_utils.sweep import InferenceConfig

    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, :2]).all()
    # top-p 0.5: the most likely id alone has p ≈ 0.64 ≥ 0.5
    kept = ~torch.isinf(filter_logits(logits, 0, 0.5))
    assert kept.tolist() == [[False, False, False, True]]
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).expand(3, 4)
    assert sample_inverse_cdf(probs, torch.tensor([0.0, 0.49, 0.999])).tolist() == [1, 1, 3]
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        SamplingConfig(min_new_tokens=0)
    with pytest.raises(ValueError, match=r"ref_mask_ratios must lie in \[0, 1\], got \[1.5\]"):
        InferenceConfig(ref_mask_ratios=[0.0, 1.5])
    with pytest.raises(ValueError, match="duplicates"):
        InferenceConfig(ref_mask_ratios=[0.1, 0.1])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sweep_is_deterministic_and_resumes_after_interruption(world, tmp_path, monkeypatch):
    from PIL import Image

    from pigeon_utils.generation import SamplingConfig
    from pigeon_utils.sweep import InferenceConfig, load_index, run_sweep

    model, ds = world
    cfg = InferenceConfig(ref_mask_ratios=(0.0, 1.0), batch_size=2, seed=3, num_inference_steps=2,
                          sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=8))
    kw = dict(max_samples=4, progress=False)
    a = run_sweep(model, ds, "test", tmp_path / "a", cfg, **kw)
    assert (a.generated, a.skipped) == (4, 0)
    index = load_index(tmp_path / "a")
    assert sorted(index["samples"]) == ["0", "1", "2", "3"]
    assert set(index["samples"]["0"]["images"]) == {"0.00", "1.00"}
    png = tmp_path / "a" / index["samples"]["2"]["images"]["1.00"]["path"]
    assert png.parent.name == "1.00" and Image.open(png).size == (64, 64)
    again = run_sweep(model, ds, "test", tmp_path / "a2", cfg, **kw)
    assert _files(tmp_path / "a") == _files(tmp_path / "a2")  # same seed → identical images and index
    # the batch size changes the speed, not the images (the toy world sweeps 16 per batch)
    other = run_sweep(model, ds, "test", tmp_path / "a3", replace(cfg, batch_size=3), **kw)
    assert {k: v for k, v in _files(tmp_path / "a3").items() if k.endswith(".png")} == \
        {k: v for k, v in _files(tmp_path / "a").items() if k.endswith(".png")}
    assert other.index["samples"] == index["samples"]

    # interrupted after one sample, then killed while writing a PNG of the third
    b = tmp_path / "b"
    assert run_sweep(model, ds, "test", b, cfg, **kw, interrupt_after=1).generated == 1
    first = b / index["samples"]["0"]["images"]["0.00"]["path"]
    stamp = first.stat().st_mtime_ns
    real_save, calls = Image.Image.save, []

    def dying_save(self, fp, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # sample 1 done (2 images), die in the middle of sample 2's first image
            fp.write(b"\x89PNG\r\n")
            raise KeyboardInterrupt("killed")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(model, ds, "test", b, cfg, **kw)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert sorted(load_index(b)["samples"]) == ["0", "1"]  # the index holds finished samples only
    assert not (b / index["samples"]["2"]["images"]["0.00"]["path"]).exists()  # no truncated PNG under its name
    assert list(b.rglob(".*.tmp*"))  # only a temporary file was left behind
    c = run_sweep(model, ds, "test", b, cfg, **kw)
    assert (c.generated, c.skipped) == (2, 2)
    assert first.stat().st_mtime_ns == stamp  # finished images were not redone
    assert _files(b) == _files(tmp_path / "a")

    # resuming with other settings is refused, naming what differs
    with pytest.raises(ValueError, match="ref_mask_ratios"):
        run_sweep(model, ds, "test", b, InferenceConfig(ref_mask_ratios=(0.0, 0.5), seed=3, batch_size=2,
                                                        num_inference_steps=2, sampling=cfg.sampling), **kw)
    assert json.loads((b / "index.json").read_text())["config"]["ref_mask_ratios"] == [0.0, 1.0]


def _full_forward(model, x, batch, b, toks):
    """Logits [1, T + n, V] of sample b's inference prompt (embeddings `x`) followed by the ids `toks` [1, n],
    without a KV cache."""
    from pigeon_utils.generation import base_lm

    am, pos = batch.seq.attention_mask[b:b + 1], batch.seq.position_ids[b:b + 1]
    n = toks.shape[1]
    xe = torch.cat([x[b:b + 1], model.token_embeddings(toks)], 1)
    a = torch.cat([am, am.new_ones(1, n)], 1)
    p = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(n)[None]], 1)
    return base_lm(model)(inputs_embeds=xe, attention_mask=a, position_ids=p).logits.float()


def _reference_beam_sample(model, batch, ratio, b, u, sc):
    """transformers 4.33.2 ``beam_sample`` for one (sample b, α_r), written plainly: no KV cache (full forward per
    step), Python lists for beams and hypotheses, the same uniforms `u` [max_new, 2K] for the draws."""
    from pigeon_utils.generation import VisualOnlyLogitsProcessor, base_lm
    from pigeon_utils.sampling import draw_without_replacement, filter_logits

    k, eos, inf = sc.num_beams, model.layout.emb_id, float("-inf")
    x, _ = model.input_embeddings(batch, ratio, inference=True)
    ids = batch.seq.input_ids[b:b + 1]
    procs = [VisualOnlyLogitsProcessor(model.layout, base_lm(model).config.vocab_size),
             model.backbone.visual_logits_processor()]
    beams = [(0.0, [])] * k  # (running score, tokens); every beam starts with score 0
    hyps = []  # (score / length, tokens)
    for step in range(sc.max_new_tokens):
        rows = []
        for score, toks in beams:  # one full forward per beam
            t = torch.tensor([toks], dtype=torch.long)
            s = torch.log_softmax(_full_forward(model, x, batch, b, t)[:, -1], -1)
            for proc in procs:
                s = proc(torch.cat([ids, t], 1), s)
            if step < sc.min_new_tokens:
                s[:, eos] = inf
            rows.append(filter_logits((s + score) / sc.temperature, sc.top_k, sc.top_p, min_keep=2))
        flat = torch.cat(rows, 1)
        vocab = rows[0].shape[1]
        idx, valid = draw_without_replacement(torch.softmax(flat, -1), u[step:step + 1])
        cands = sorted(((float(flat[0, i]), int(i) // vocab, int(i) % vocab) for i, v in zip(idx[0], valid[0]) if v),
                       key=lambda c: -c[0])
        nxt = []
        for rank, (score, beam, tok) in enumerate(cands):  # BeamSearchScorer.process
            if tok == eos:
                if rank < k:
                    hyps.append((score / (step + 1), beams[beam][1]))
                    hyps = sorted(hyps, key=lambda h: -h[0])[:k]
            else:
                nxt.append((score, beams[beam][1] + [tok]))
            if len(nxt) == k:
                break
        if not nxt or (len(hyps) == k and hyps[-1][0] >= cands[0][0] / (step + 1)):
            break
        beams = nxt + [(inf, nxt[0][1])] * (k - len(nxt))
        if step + 1 == sc.max_new_tokens:
            hyps = sorted(hyps + [(s / (step + 2), t) for s, t in beams if s > inf], key=lambda h: -h[0])[:k]
    best = torch.tensor(hyps[0][1], dtype=torch.long)
    return best[model.layout.is_visual(best)] - model.layout.visual_offset


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_beam_sample_matches_plain_reference(world, temperature):
    from pigeon_utils.generation import SamplingConfig, generate_tokens
    from pigeon_utils.seeds import row_seed

    model, ds = world
    batch = _batch(model, ds, [0, 1, 2])
    ratios = [0.0, 1.0]
    sc = SamplingConfig(min_new_tokens=2, max_new_tokens=12, num_beams=3, temperature=temperature)
    got = generate_tokens(model, batch, ratios, sc, seed=4)
    with torch.no_grad():
        for b in range(3):
            for j, r in enumerate(ratios):
                u = torch.rand(sc.max_new_tokens, 2 * sc.num_beams,
                               generator=torch.Generator().manual_seed(row_seed(4, int(batch.index[b]), r)))
                assert torch.equal(got[b][j], _reference_beam_sample(model, batch, r, b, u, sc)), (b, r)


def _mean_logprob(model, batch, ratio, b, codes):
    """log p(codes, [/IMG] | prompt) per token under the model (teacher forcing, full forward)."""
    lay = model.layout
    toks = torch.cat([codes + lay.visual_offset, torch.tensor([lay.emb_id])])[None]
    x, _ = model.input_embeddings(batch, ratio, inference=True)
    logp = torch.log_softmax(_full_forward(model, x, batch, b, toks[:, :-1]), -1)
    return float(logp[0, -toks.shape[1]:].gather(1, toks[0][:, None]).mean())


def test_beams_seek_the_mode(world):
    """4 beams find sequences the model finds more likely than plain samples (num_beams=1) do."""
    from pigeon_utils.generation import SamplingConfig, generate_tokens

    model, ds = world
    ks = list(range(6))
    batch = _batch(model, ds, ks)
    ratios = [0.0, 0.5, 1.0]
    sc = dict(min_new_tokens=2, max_new_tokens=6)
    plain = generate_tokens(model, batch, ratios, SamplingConfig(**sc, num_beams=1), seed=1)
    beams = generate_tokens(model, batch, ratios, SamplingConfig(**sc, num_beams=4), seed=1)
    with torch.no_grad():
        lp = [[_mean_logprob(model, batch, r, b, out[b][j]) for b in ks for j, r in enumerate(ratios)]
              for out in (plain, beams)]
    assert sum(lp[1]) / len(lp[1]) > sum(lp[0]) / len(lp[0]) + 0.1, lp
    with pytest.raises(ValueError, match="num_beams"):
        SamplingConfig(num_beams=0)


def test_beam_bookkeeping_by_hand():
    from pigeon_utils.sampling import beam_done, beam_process, draw_without_replacement

    inf, eos = float("-inf"), 9
    # candidates sorted by score; K = 2: the end id at rank 0 finishes, the one at rank 2 is ignored
    score = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    ids = torch.tensor([[eos, 5, eos, 6]])
    beam = torch.tensor([[1, 0, 0, 1]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    finish, s, i, b = beam_process(score, ids, beam, valid, 2, eos)
    assert finish.tolist() == [[True, False]]
    assert s.tolist() == [[-2.0, -4.0]] and i.tolist() == [[5, 6]] and b.tolist() == [[0, 1]]
    # too few valid continuations: a dead beam (score −inf)
    finish, s, i, b = beam_process(score, ids, beam, torch.tensor([[True, True, True, False]]), 2, eos)
    assert s.tolist() == [[-2.0, inf]]
    # done: K hypotheses and the worst beats the best candidate / length; or nothing alive
    hyps = torch.tensor([[-0.5, -1.0], [-0.5, inf], [-0.5, -1.0]])
    best = torch.tensor([-3.0, -3.0, -1.0])
    alive = torch.tensor([[-3.0, -4.0]] * 3)
    assert beam_done(hyps, best, 2, 1.0, alive).tolist() == [True, False, False]  # -1 ≥ -1.5; not full; -1 < -0.5
    assert beam_done(hyps, best, 2, 1.0, torch.full((3, 2), inf)).tolist() == [True, True, True]
    # drawing without replacement: never the same id twice, never a zero-probability id
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2]])
    idx, ok = draw_without_replacement(probs, torch.tensor([[0.99, 0.99, 0.0, 0.5]]))
    assert idx[0, :3].tolist() == [3, 2, 0] and ok.tolist() == [[True, True, True, False]]


def test_beam_candidates_draw_over_nonzero_entries_as_over_full_rows():
    """`_beam_candidates` draws over the non-zero entries only; ids, scores and validity are those of the draws over
    the full rows, also for a row with fewer entries than draws (its last draws invalid, id K·V − 1)."""
    from pigeon_utils.sampling import beam_candidates, draw_without_replacement, filter_logits

    g = torch.Generator().manual_seed(3)
    k, vocab = 3, 40
    flat = filter_logits(torch.randn(5 * k, vocab, generator=g), 6, 1.0, min_keep=2).reshape(5, k * vocab)
    flat[4] = float("-inf")
    flat[4, [7, 50, 99]] = torch.tensor([-1.0, -0.5, -2.0])  # 3 entries for 2K = 6 draws
    u = torch.rand(5, 2 * k, generator=g)
    score, ids, beam, valid = beam_candidates(flat, u, vocab)
    idx, ok = draw_without_replacement(torch.softmax(flat, -1), u)
    want = flat.gather(1, idx).masked_fill(~ok, float("-inf"))
    order = want.sort(dim=1, descending=True, stable=True).indices
    assert torch.equal(valid, ok.gather(1, order)) and torch.equal(score, want.gather(1, order))
    assert torch.equal(ids + beam * vocab, idx.gather(1, order))
    assert valid[4].tolist() == [True] * 3 + [False] * 3 and (ids[4, 3:] + beam[4, 3:] * vocab == k * vocab - 1).all()


def test_reserved_cache_matches_concatenating_cache():
    """`reserve_room` (generated tokens written in place into spare room) holds exactly what transformers' concatenating
    DynamicCache holds through every operation the sampling loops use: appends past the room (it grows), repeat and
    select of rows, and the in-place reorder of the generated part."""
    from transformers.cache_utils import DynamicCache

    from pigeon_utils.kv_cache import reorder_generated, reserve_room

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    plain, reserved = DynamicCache(), DynamicCache()
    k, v = rnd(3, 2, 5, 4), rnd(3, 2, 5, 4)
    for c in (plain, reserved):
        for layer in range(2):
            c.update(k + layer, v - layer, layer)
    reserve_room(reserved, 2)
    assert {type(layer).__name__ for layer in reserved.layers} == {"ReservedLayer"}

    def same():
        assert reserved.get_seq_length() == plain.get_seq_length()
        for a, b in zip(plain.layers, reserved.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)

    for step in range(5):  # the room holds 2 new positions: steps 2… grow it
        if step == 1:
            for c in (plain, reserved):
                c.batch_repeat_interleave(2)
        if step == 3:
            for c in (plain, reserved):
                c.batch_select_indices(torch.tensor([5, 0, 3]))
        n = plain.layers[0].keys.shape[0]
        nk, nv = rnd(n, 2, 1, 4), rnd(n, 2, 1, 4)
        for layer in range(2):
            out_p = plain.update(nk * (layer + 1), nv, layer)
            out_r = reserved.update(nk * (layer + 1), nv, layer)
            assert all(torch.equal(a, b) for a, b in zip(out_p, out_r))
        parent = torch.randint(n, (n,), generator=g)
        for c in (plain, reserved):
            reorder_generated(c, parent, 5)
        same()


def _attend_full_rows(q, keys, values, mask):
    """Reference attention per row: `keys` / `values` [N, H_kv, L, d] the row's whole sequence, `mask` [N, q, L]
    (True = attend); query heads share key / value heads as transformers' ``repeat_kv`` does."""
    g = q.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]).transpose(1, 2)


def test_shared_prefix_attention_equals_attention_over_full_rows():
    """The prefix held once per sample + each row's own keys gives the attention of rows that hold their whole
    sequence: left padding of the prefix, causal new queries, grouped-query heads, equal and unequal numbers of rows
    per sample, through beam repeats, row selection (a sample leaving), reordering and growth past the room."""
    from pigeon_utils.kv_cache import SharedPrefixCache, shared_prefix_attention

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    n_s, hk, h, c, d = 3, 2, 4, 6, 8
    layers = [type("Attn", (), {"layer_idx": i})() for i in range(2)]
    prefix = [(rnd(n_s, hk, c, d), rnd(n_s, hk, c, d)) for _ in layers]
    pmask = torch.ones(n_s, c, dtype=torch.bool)
    pmask[1, :2] = pmask[2, :1] = False  # left padding
    owner = torch.tensor([0, 0, 1, 1, 1, 2])  # unequal rows per sample
    cache = SharedPrefixCache(prefix, pmask, owner, capacity=4)
    own = [[torch.empty(len(owner), hk, 0, d)] * 2 for _ in layers]  # the reference: each row's own keys / values

    def step(q_len: int):
        n = len(cache.owner)
        for li, layer in enumerate(layers):
            q, k, v = rnd(n, h, q_len, d), rnd(n, hk, q_len, d), rnd(n, hk, q_len, d)
            ok, ov = cache.update(k, v, li)
            own[li] = [torch.cat([own[li][0], k], 2), torch.cat([own[li][1], v], 2)]
            assert torch.equal(ok, own[li][0]) and torch.equal(ov, own[li][1])
            got, _ = shared_prefix_attention(layer, q, ok, ov, None, shared_prefix=cache)
            m = own[li][0].shape[2]
            causal = torch.arange(m)[None, :] <= (m - q_len + torch.arange(q_len))[:, None]
            mask = torch.cat([pmask[cache.owner][:, None, :].expand(-1, q_len, -1),
                              causal[None].expand(n, -1, -1)], 2)
            pk, pv = prefix[li]
            want = _attend_full_rows(q, torch.cat([pk[cache.owner], own[li][0]], 2),
                                     torch.cat([pv[cache.owner], own[li][1]], 2), mask)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    step(3)  # the suffix: three new queries, causal among themselves
    step(1)
    cache.batch_repeat_interleave(2)  # beams: 12 rows
    owner_ref = owner.repeat_interleave(2)
    own = [[x.repeat_interleave(2, 0) for x in kv] for kv in own]
    assert torch.equal(cache.owner, owner_ref)
    step(1)  # 5 own positions, past the room of 4: the buffer grows
    parent = torch.tensor([1, 0, 2, 2, 4, 5, 7, 6, 8, 9, 10, 10])  # within each (sample, row) group of beams
    cache.reorder_generated(parent, c + 4)  # the positions generated after the 4 shared ones
    for kv in own:
        for x in kv:
            x[:, :, 4:] = x[parent, :, 4:]
    step(1)
    keep = torch.tensor([4, 5, 6, 7, 8, 9])  # only sample 1's rows: samples 0 and 2 leave the prefix
    cache.batch_select_indices(keep)
    own = [[x[keep] for x in kv] for kv in own]
    assert cache.owner.tolist() == [0] * 6 and len(cache.prefix_mask) == 1
    prefix = [(k[1:2], v[1:2]) for k, v in prefix]
    pmask = pmask[1:2]
    step(1)
    step(2)


def test_sweep_reads_the_prefix_once_per_sample_and_restores_attention(world):
    """prefill keeps one prefix per sample; the shared-prefix attention is selected only while the sweep runs."""
    from pigeon_utils.generation import base_lm, prefill
    from pigeon_utils.kv_cache import SharedPrefixCache

    model, ds = world
    batch = _batch(model, ds, [0, 1])
    before = base_lm(model).config._attn_implementation
    _, cache, am, _ = prefill(model, batch, [0.0, 0.5, 1.0], reserve=5)
    assert isinstance(cache, SharedPrefixCache)
    assert cache.owner.tolist() == [0, 0, 0, 1, 1, 1] and cache.prefix[0][0].shape[0] == 2
    assert cache.get_seq_length() == am.shape[1]
    assert base_lm(model).config._attn_implementation == before


def test_decode_images_gives_each_sample_its_own_noise(world):
    """A sweep batch decoded in one call: each sample's images are those of decoding it alone with its generator
    (up to float rounding between batch shapes); noise for the wrong number of images is refused."""
    from pigeon_utils.generation import decode_images
    from pigeon_utils.seeds import row_seed

    model, _ = world
    g = torch.Generator().manual_seed(0)
    codes = [[torch.randint(0, 50, (n,), generator=g) for n in (3, 5)]] * 3  # the same codes for three samples
    together = decode_images(model, codes, [4, 9, 2], seed=7, num_inference_steps=2)
    assert together.shape[0] == 6
    for b, k in enumerate([4, 9, 2]):
        alone = model.decode(codes[b], generator=torch.Generator().manual_seed(row_seed(7, k)), num_inference_steps=2)
        torch.testing.assert_close(together[2 * b: 2 * b + 2], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0:2], together[2:4], atol=1e-3)  # same codes, other sample: other noise
    with pytest.raises(ValueError, match="noise"):
        model.decode(codes[0], noise=model.backbone.pixel_decoder.draw_noise(3), num_inference_steps=2)


SHARD_SCRIPT = r"""
import sys, torch
import pigeon_utils
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_sft import DATA, load_smoke
from pigeon_utils.data import open_dataset
from pigeon_utils.generation import SamplingConfig
from pigeon_utils.model import PigeonModel, PigeonModelConfig
from pigeon_utils.sweep import InferenceConfig, run_sweep
torch.set_num_threads(1)
backbone = load_smoke(Path({smoke!r}))
torch.manual_seed(0)  # as the `world` fixture initialises its model
model = PigeonModel(backbone, PigeonModelConfig(adapter_hidden=16, mask_feedforward=32)).eval()
cfg = InferenceConfig(ref_mask_ratios=(0.0, 1.0), batch_size=2, seed=3, num_inference_steps=2,
                      sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=8))
run_sweep(model, open_dataset(DATA, "movie"), "test", Path({out!r}), cfg, max_samples=5, progress=False)
"""


def test_sweep_shards_across_processes(world, tmp_path):
    """Two processes (torchrun, gloo) share the sweep's batches; the merged index and every image equal a
    single-process run's."""
    import os
    import subprocess
    import sys

    from test_sft import REPO, _free_port

    from pigeon_utils.generation import SamplingConfig
    from pigeon_utils.sweep import InferenceConfig, run_sweep

    model, ds = world
    smoke = Path(model.backbone.checkpoint_dir)
    cfg = InferenceConfig(ref_mask_ratios=(0.0, 1.0), batch_size=2, seed=3, num_inference_steps=2,
                          sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=8))
    run_sweep(model, ds, "test", tmp_path / "one", cfg, max_samples=5, progress=False)
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT.format(tests=str(Path(__file__).parent), smoke=str(smoke),
                                          out=str(tmp_path / "two")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "--master_addr=127.0.0.1", str(script)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-4000:]
    assert not list((tmp_path / "two").glob("index.part-*.json"))  # the shards were merged and removed
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(one) == sorted(two) and [k for k in one if one[k] != two[k]] == []
