"""The toy LMM: a small ``transformers.LlamaForCausalLM`` with LaVIT's id layout, pre-trained on toy multimodal
sequences, and the logits processor that keeps its generated visual tokens well-formed.

Pre-training data: for each toy image (:func:`pretraining_segments`), either

* caption -> image:  ``caption [IMG] v_1 … v_n [/IMG]``  (text-to-image, what Pigeon's generation builds on), or
* image -> caption:  ``[IMG] v_1 … v_n [/IMG] caption </s>``  (understanding),

plus *style documents* (:func:`document_segments`): a few images sharing their style, the context images with or
without a caption, the last one with its glyph only (in-context style, what Pigeon's history relies on),

with ``v = visual_offset + code``. Segments are shuffled and packed back to back into fixed-length rows, so a row
holds several images (as Pigeon's prompts do) and the loss is next-token cross-entropy everywhere.

Generation rule (:class:`ToyVisualGrammar`): after ``[IMG]`` the image token comes first; after it, patch tokens
in increasing patch position, or ``[/IMG]``. It only touches visual ids and ``[/IMG]``; Pigeon gets it from
:meth:`pigeon_utils.backbone.Backbone.visual_logits_processor`, never by name.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from transformers import LogitsProcessor

from pigeon_utils.prompts import IdLayout


def make_llama(vocab_size: int, layout: IdLayout, hidden: int = 128, layers: int = 4, heads: int = 4,
               intermediate: int = 384, max_positions: int = 1024):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=layout.pad_id, initializer_range=0.02)
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def init_visual_embeddings(model, layout: IdLayout, code_table: dict[str, Tensor], gen: torch.Generator,
                           std: float = 0.02) -> None:
    """Start the LMM's visual-id embeddings from what each code means, instead of independent noise.

    Each code's description (the tokenizer's :meth:`~pigeon_utils.toy.tokenizer.ToyVisualTokenizer.code_table`:
    one-hot patch position, shape centroid, background tile, colour; each block centred and L2-normalised) goes
    through one random Gaussian projection to the hidden size, scaled to `std` (the Llama initialiser's). Codes at
    the same position or of similar shape then start close, so what the LMM learns about one carries over to its
    neighbours (the embeddings are tied, so this also shapes the output layer).
    """
    pos = code_table["position"]
    onehot = torch.nn.functional.one_hot(pos.clamp(min=0), int(pos.max()) + 1).float() * (pos >= 0).float()[:, None]
    blocks = [onehot, code_table["mask"].float(), code_table["tile"].float(), code_table["colour"].float()]
    feats = []
    for b in blocks:
        used = b.abs().sum(1, keepdim=True) > 0
        b = torch.where(used, b - b[used[:, 0]].mean(0, keepdim=True), b) if used.any() else b
        feats.append(b / b.norm(dim=1, keepdim=True).clamp(min=1e-6))
    feats = torch.cat(feats, 1)
    emb = model.get_input_embeddings().weight
    x = feats @ torch.randn(feats.shape[1], emb.shape[1], generator=gen)
    emb[layout.visual_offset: layout.visual_offset + len(x)] = (x / x.std() * std).to(emb)


class ToyVisualGrammar(LogitsProcessor):
    """A ``transformers`` logits processor: visual tokens of a toy image must be ``image token, patch tokens
    with strictly increasing positions``. Vectorised over the batch and the vocabulary.

    ``position`` [codebook_size] is the tokenizer's code -> patch position table (-1 for image tokens). What is
    banned depends on the last id only — outside an image (nothing), right after ``[IMG]`` (patches and
    ``[/IMG]``), or after an image / patch token at position p (image tokens and patches at positions ≤ p) — so
    the ban of each such state is one precomputed row, and a step is one row lookup and one fill.
    """

    def __init__(self, layout: IdLayout, position: Tensor):
        v = layout.vocab_size
        self.layout = layout
        pos = torch.full((v,), -2, dtype=torch.long)  # -2: not a visual id ([IMG] included)
        pos[layout.visual_offset:] = position
        self.pos = pos
        is_image_tok, is_patch = pos == -1, pos >= 0
        is_end = torch.zeros(v, dtype=torch.bool)
        is_end[layout.emb_id] = True
        # state 0: outside an image; 1: right after [IMG]; 2 + (p + 1): after a token at position p ≥ -1
        self.bans = torch.stack([torch.zeros(v, dtype=torch.bool), is_patch | is_end]
                                + [is_image_tok | (is_patch & (pos <= p)) for p in range(-1, int(pos.max()) + 1)])

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        dev = scores.device
        if self.pos.device != dev:  # tables follow the model's device once
            self.pos, self.bans = self.pos.to(dev), self.bans.to(dev)
        last = input_ids[:, -1].to(dev)
        n = scores.shape[-1]
        last_pos = self.pos[last.clamp(max=n - 1)]
        state = torch.where(last == self.layout.img_id, 1, torch.where(last_pos >= -1, last_pos + 3, 0))
        return scores.masked_fill(self.bans.index_select(0, state)[:, :n], float("-inf"))


class SuppressText(LogitsProcessor):
    """Bans every id below ``layout.img_id`` (text) — what Pigeon's generation does with ids 3..31999."""

    def __init__(self, layout: IdLayout):
        self.n = layout.img_id

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        scores = scores.clone()
        scores[:, : self.n] = float("-inf")
        return scores


def image_span(codes: Tensor, layout: IdLayout) -> Tensor:
    """One image's ids: ``[IMG] v_1 … v_n [/IMG]`` with ``v = visual_offset + code``."""
    return torch.cat([torch.tensor([layout.img_id]), codes + layout.visual_offset, torch.tensor([layout.emb_id])])


def pretraining_segments(codes: Sequence[Tensor], caption_ids: Sequence[Sequence[int]], layout: IdLayout,
                         eos_id: int, p_caption_first: float, gen: torch.Generator) -> list[Tensor]:
    """One id segment per image: caption -> image with probability `p_caption_first`, else image -> caption."""
    first = torch.rand(len(codes), generator=gen) < p_caption_first
    out = []
    for c, w, f in zip(codes, caption_ids, first.tolist()):  # one per image
        w = torch.as_tensor(w, dtype=torch.long)
        v = image_span(c, layout)
        out.append(torch.cat([w, v]) if f else torch.cat([v, w, torch.tensor([eos_id])]))
    return out


def document_segments(doc_codes: Sequence[Sequence[Tensor]], doc_captions: Sequence[Sequence[Sequence[int] | None]],
                      layout: IdLayout, bos_id: int | None = None, eos_id: int | None = None) -> list[Tensor]:
    """One segment per *style document* — a few images that share most of their style, like the image sets of
    LaVIT's interleaved pre-training data. Each image is ``[caption] [IMG] v … [/IMG]``, its caption ids taken from
    `doc_captions` (None: no caption). The build's copy phase leaves the context images uncaptioned and gives the
    last image its glyph only, so the last image's style is in no text, only in the images before it: the LMM
    learns to read style from its visual context — what Pigeon's history needs. With `bos_id` / `eos_id` a
    document starts with ``<s>`` and ends with ``</s>``, so packed rows show where it begins.
    """
    head = [torch.tensor([bos_id])] if bos_id is not None else []
    tail = [torch.tensor([eos_id])] if eos_id is not None else []
    out = []
    for codes, caps in zip(doc_codes, doc_captions):  # one per document
        if len(codes) != len(caps):
            raise ValueError(f"document_segments: {len(codes)} images but {len(caps)} captions in one document")
        parts = list(head)
        for c, w in zip(codes, caps):
            if w is not None:
                parts.append(torch.as_tensor(w, dtype=torch.long))
            parts.append(image_span(c, layout))
        out.append(torch.cat(parts + tail))
    return out


def packed_rows(segments: Sequence[Tensor], row_len: int, gen: torch.Generator) -> Tensor:
    """Shuffle the segments, concatenate them and cut the stream into rows [R, row_len] (the tail is dropped)."""
    order = torch.randperm(len(segments), generator=gen).tolist()
    stream = torch.cat([segments[i] for i in order])
    r = len(stream) // row_len
    return stream[: r * row_len].view(r, row_len)


def train_lmm(model, segments: Sequence[Tensor], steps: int, batch: int, row_len: int, lr: float,
              gen: torch.Generator, progress: bool = True, time_budget_s: float | None = None,
              check=None, check_every: int = 100, stop_at: float | None = None) -> dict:
    """Next-token pre-training on packed rows (AdamW, warm-up then cosine decay). Stops early when
    `time_budget_s` runs out, or when ``check()`` (called in eval mode every `check_every` steps, its values kept
    under ``"checks"`` as [step, value]) reaches `stop_at`. Returns ``{"steps", "tokens", "loss"[, "checks"]}``."""
    import time

    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    model.train()
    rows, cursor, done, loss_ema = packed_rows(segments, row_len, gen), 0, 0, float("nan")
    checks: list[list] = []
    t0 = time.monotonic()
    bar = tqdm(range(steps), desc="toy LMM", disable=not progress, mininterval=2)
    for step in bar:
        if cursor + batch > len(rows):
            rows, cursor = packed_rows(segments, row_len, gen), 0
        x = rows[cursor: cursor + batch].to(model.device)
        cursor += batch
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss.item()
        done = step + 1
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss_ema:.3f}")
        if time_budget_s is not None and time.monotonic() - t0 > time_budget_s:
            break
        if check is not None and done % check_every == 0:
            model.eval()
            checks.append([done, round(float(check()), 4)])
            model.train()
            if stop_at is not None and checks[-1][1] >= stop_at:
                break
    model.eval()
    out = {"steps": done, "tokens": done * batch * row_len, "loss": loss_ema}
    return {**out, "checks": checks} if check is not None else out


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Id prompts -> (ids [B, T] left-padded with `pad_id`, attention mask [B, T], 0 on the padding), on `device`."""
    t = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (t - len(p)) + list(p) for p in prompts], device=device)
    attn = (torch.arange(t)[None] >= torch.tensor([t - len(p) for p in prompts])[:, None]).long().to(device)
    return ids, attn


@torch.no_grad()
def generate_images_codes(model, text_tokenizer, layout: IdLayout, grammar: ToyVisualGrammar,
                          captions: Sequence[str], gen_seed: int, top_k: int = 50, temperature: float = 1.0,
                          max_new_tokens: int = 72, batch: int = 128) -> list[Tensor]:
    """Caption -> code ids per caption: prompt ``<s> caption [IMG]``, sample until ``[/IMG]`` under the grammar,
    with text ids suppressed. Deterministic given `gen_seed`."""
    from transformers import LogitsProcessorList

    out: list[Tensor] = []
    procs = LogitsProcessorList([SuppressText(layout), grammar])
    torch.manual_seed(gen_seed)  # generate() samples with the global generator
    for i in range(0, len(captions), batch):
        prompts = [[text_tokenizer.bos_token_id] + text_tokenizer(c, add_special_tokens=False)["input_ids"]
                   + [layout.img_id] for c in captions[i:i + batch]]
        ids, attn = left_padded(prompts, layout.pad_id, model.device)
        t = ids.shape[1]
        seq = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, top_k=top_k,
                             temperature=temperature, max_new_tokens=max_new_tokens, eos_token_id=layout.emb_id,
                             pad_token_id=layout.pad_id, logits_processor=procs)[:, t:]
        vis = layout.is_visual(seq)
        out += [(row[m] - layout.visual_offset).cpu() for row, m in zip(seq, vis)]
    return out
