"""The toy dynamic visual tokenizer: 64×64 image -> 1 image token + one token per kept 8×8 patch.

LaVIT's tokenizer keeps the informative patches (its token selector), folds the dropped ones into the kept ones
(its token merger) and snaps each kept token to a codebook entry whose meaning includes where it sits. The toy
does the same with transparent parts, fitted (not hand-coded) on toy images:

* **selector**: the image's background tile is its most common 8×8 patch, snapped to the nearest fitted tile; a
  patch is kept when at least ``min_pixels`` of its pixels differ from that tile by more than ``threshold``.
* **image token** (stands for all dropped patches): code ``tile * n_colours + colour`` — the background tile and the
  foreground colour (nearest of ``n_colours`` k-means colour centroids of the image's foreground pixels).
  Its patch index is -1.
* **patch tokens**, raster order: the patch's foreground mask (64 bits) snapped to the nearest of ``n_shapes``
  k-means centroids *of that patch position*, so the code folds position and content into one id:
  ``code = n_global + position * n_shapes + shape``.

So an image gives ``1 + (number of kept patches)`` tokens (typically 6–30), one visual token per kept patch plus
the image token, and Pigeon's masking can keep or drop any of them. Codebook size = ``n_tiles * n_colours +
64 * n_shapes``. :meth:`ToyVisualTokenizer.render_codes` draws codes back by their centroids (a preview; the
real decoder is the diffusion model).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from pigeon_utils.backbone import CheckpointError, VisualTokenizer, VisualTokens
from pigeon_utils.toy.io import read_json, read_safetensors, write_json, write_safetensors


@dataclass
class ToyTokenizerConfig:
    image_size: int = 64
    patch_size: int = 8
    threshold: float = 24.0  # max channel difference (0-255) above which a pixel is foreground
    min_pixels: int = 2  # a patch is kept when at least this many pixels are foreground
    n_colours: int = 8
    n_shapes: int = 64  # shape centroids per patch position
    max_tiles: int = 8
    n_tiles: int = 0  # set by fitting

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid**2

    @property
    def n_global(self) -> int:
        return self.n_tiles * self.n_colours

    @property
    def codebook_size(self) -> int:
        return self.n_global + self.n_patches * self.n_shapes


#: side of the toy world's images (what the toy tokenizer and the toy CLIP read)
IMAGE_SIZE = 64


def _square_rgb(im, size: int) -> np.ndarray:
    """One PIL image or uint8 [H, W, 3] array -> uint8 [size, size, 3]: upright, RGB, bicubic-resized if needed."""
    from PIL import Image

    from pigeon_utils.images import to_rgb

    if not isinstance(im, Image.Image):
        arr = np.asarray(im, dtype=np.uint8)
        if arr.shape == (size, size, 3):
            return arr
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected a PIL image or a uint8 [H, W, 3] array, got shape {arr.shape}")
        im = Image.fromarray(np.ascontiguousarray(arr))
    im = to_rgb(im)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def images_to_array(images: Sequence, size: int = IMAGE_SIZE) -> np.ndarray:
    """PIL images (any size or mode, EXIF-rotated too) or uint8 arrays -> uint8 [B, size, size, 3] (each image
    made upright RGB by :func:`pigeon_utils.images.to_rgb`, then bicubic-resized when its size differs)."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (size, size, 3):
        return images.astype(np.uint8, copy=False)
    return np.stack([_square_rgb(im, size) for im in images])


def _patchify(x: Tensor, p: int) -> Tensor:
    """[B, H, W, 3] -> [B, (H/p)*(W/p), p, p, 3] in raster order."""
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, p, p, c)


def _unpatchify(x: Tensor, g: int) -> Tensor:
    """[B, g*g, p, p, 3] -> [B, g*p, g*p, 3]."""
    b, _, p, _, c = x.shape
    return x.reshape(b, g, g, p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, c)


def _mode_patch(patches: Tensor) -> Tensor:
    """The most common patch of each image: [B, N, P] -> [B, P] (ties: the first in raster order)."""
    weights = torch.randint(1, 2**31 - 1, (patches.shape[-1],), generator=torch.Generator().manual_seed(0))
    h = (patches.long() * weights).sum(-1)  # a hash of each patch
    counts = (h[:, :, None] == h[:, None, :]).sum(-1)
    idx = counts.argmax(dim=1)
    return patches[torch.arange(len(patches)), idx]


def _kmeans(x: Tensor, valid: Tensor, k: int, iters: int, gen: torch.Generator) -> Tensor:
    """Batched Lloyd k-means: ``x`` [G, N, D], ``valid`` [G, N] -> centroids [G, k, D].

    Initialised by farthest-point seeding from a random valid point (each next centroid is the valid point
    farthest from those chosen; a group with fewer distinct points repeats them); a cluster that loses all its
    points keeps its centroid.
    """
    g, n, d = x.shape
    first = (torch.rand(g, n, generator=gen) + valid.float() * 2).argmax(1)  # a random valid point
    cent = torch.empty(g, k, d)
    cent[:, 0] = x[torch.arange(g), first]
    dmin = torch.full((g, n), float("inf"))
    for j in range(1, k):
        dmin = torch.minimum(dmin, ((x - cent[:, j - 1:j]) ** 2).sum(-1))
        cent[:, j] = x[torch.arange(g), torch.where(valid, dmin, torch.tensor(-1.0)).argmax(1)]
    w = valid.float()
    for _ in range(iters):
        assign = torch.cdist(x, cent).argmin(-1)  # [G, N]
        sums = torch.zeros(g, k, d).scatter_add_(1, assign[..., None].expand(g, n, d), x * w[..., None])
        cnt = torch.zeros(g, k).scatter_add_(1, assign, w)
        cent = torch.where(cnt[..., None] > 0, sums / cnt.clamp(min=1)[..., None], cent)
    return cent


class ToyVisualTokenizer(VisualTokenizer):
    """See the module docstring. Fitted with :meth:`fit`, saved with :meth:`save_pretrained`."""

    def __init__(self, config: ToyTokenizerConfig, tiles: Tensor, colours: Tensor, shapes: Tensor):
        self.config = config
        self.tiles = tiles.float()  # [n_tiles, p, p, 3] (0-255)
        self.colours = colours.float()  # [n_colours, 3] (0-255)
        self.shapes = shapes.float()  # [n_patches, n_shapes, p*p] foreground-mask centroids in [0, 1]
        self.codebook_size = config.codebook_size

    # ------------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, images: Sequence, config: ToyTokenizerConfig | None = None, seed: int = 0,
            iters: int = 15) -> "ToyVisualTokenizer":
        """Fit the background tiles, colour centroids and per-position shape centroids on `images`."""
        cfg = ToyTokenizerConfig(**asdict(config)) if config is not None else ToyTokenizerConfig()
        gen = torch.Generator().manual_seed(seed)
        x = torch.from_numpy(images_to_array(images, cfg.image_size)).float()
        p, n = cfg.patch_size, cfg.n_patches
        patches = _patchify(x, p).reshape(len(x), n, -1)
        modes = _mode_patch(patches)
        uniq, counts = torch.unique(modes, dim=0, return_counts=True)
        tiles = uniq[counts.argsort(descending=True, stable=True)[: cfg.max_tiles]].reshape(-1, p, p, 3)
        cfg.n_tiles = len(tiles)
        tmp = cls(cfg, tiles, torch.zeros(cfg.n_colours, 3), torch.zeros(n, cfg.n_shapes, p * p))
        fg, keep = map(torch.cat, zip(*(tmp._foreground(x[i:i + 512])[:2] for i in range(0, len(x), 512))))
        # colour centroids: k-means over each image's mean foreground colour
        pix = _patchify(x, p)  # [B, n, p, p, 3]
        w = (fg & keep[..., None, None]).float()
        mean_col = (pix * w[..., None]).sum((1, 2, 3)) / w.sum((1, 2, 3)).clamp(min=1)[:, None]
        has_fg = keep.any(1)
        colours = _kmeans(mean_col[has_fg][None], torch.ones(1, int(has_fg.sum()), dtype=torch.bool),
                          cfg.n_colours, iters, gen)[0]
        # shape centroids per position: group the kept masks by position (padded)
        masks = fg.reshape(len(x), n, -1).float()
        pos_counts = keep.sum(0)
        nmax = int(pos_counts.max())
        grouped = torch.zeros(n, nmax, p * p)
        valid = torch.zeros(n, nmax, dtype=torch.bool)
        b_idx, pos_idx = keep.nonzero(as_tuple=True)  # sorted by image, then position
        order = pos_idx.argsort(stable=True)
        b_idx, pos_idx = b_idx[order], pos_idx[order]
        starts = torch.cumsum(pos_counts, 0) - pos_counts
        slot = torch.arange(len(pos_idx)) - starts[pos_idx]
        grouped[pos_idx, slot] = masks[b_idx, pos_idx]
        valid[pos_idx, slot] = True
        shapes = _kmeans(grouped, valid, cfg.n_shapes, iters, gen)
        return cls(cfg, tiles, colours, shapes)

    # ------------------------------------------------------------------------------------ tokenizing
    def _foreground(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` float [B, H, W, 3] -> (foreground [B, n, p, p] bool, keep [B, n] bool, tile index [B])."""
        cfg = self.config
        patches = _patchify(x, cfg.patch_size)  # [B, n, p, p, 3]
        d_tile = (patches[:, :, None] - self.tiles[None, None]).abs().amax(-1)  # [B, n, T, p, p]
        matches = (d_tile <= cfg.threshold).all(-1).all(-1).sum(1)  # [B, T] patches equal to each tile
        tile = matches.argmax(-1)
        fg = d_tile[torch.arange(len(x)), :, tile] > cfg.threshold  # [B, n, p, p]
        keep = fg.sum((-1, -2)) >= cfg.min_pixels
        return fg, keep, tile

    @torch.no_grad()
    def tokenize(self, images: Sequence, chunk: int = 512) -> VisualTokens:
        """Tokenize images of any size and mode, each resized to the toy's square (:func:`images_to_array`);
        vectorised over chunks of `chunk` images, to bound memory."""
        cfg = self.config
        arr = images_to_array(images, cfg.image_size)
        parts = [self._tokenize(torch.from_numpy(arr[i:i + chunk]).float()) for i in range(0, len(arr), chunk)]
        return VisualTokens(codes=[c for p in parts for c in p[0]], patch_index=[w for p in parts for w in p[1]],
                            grid=(cfg.grid, cfg.grid), patch_size=cfg.patch_size)

    def _tokenize(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        cfg = self.config
        fg, keep, tile = self._foreground(x)
        w = (fg & keep[..., None, None]).float()
        pix = _patchify(x, cfg.patch_size)
        mean_col = (pix * w[..., None]).sum((1, 2, 3)) / w.sum((1, 2, 3)).clamp(min=1)[:, None]
        colour = torch.cdist(mean_col, self.colours).argmin(-1)  # [B]
        global_code = tile * cfg.n_colours + colour
        b_idx, pos = keep.nonzero(as_tuple=True)  # raster order within each image
        m = fg[b_idx, pos].reshape(len(pos), -1).float()  # [K, p*p]
        shape = ((self.shapes[pos] - m[:, None]) ** 2).sum(-1).argmin(-1)  # [K]
        patch_code = cfg.n_global + pos * cfg.n_shapes + shape
        counts = keep.sum(1).tolist()
        codes = [torch.cat([g[None], c]) for g, c in zip(global_code, patch_code.split(counts))]
        where = [torch.cat([torch.tensor([-1]), q]) for q in pos.split(counts)]
        return codes, where

    # ------------------------------------------------------------------------------------ code tables
    def code_table(self) -> dict[str, Tensor]:
        """Per-code tables the detokenizer embeds (LaVIT's detokenizer reads the quantizer's codebook rows).

        ``position`` [V] (-1 for image tokens), ``mask`` [V, p*p] (shape centroid, 0 for image tokens),
        ``tile`` [V, p*p*3] and ``colour`` [V, 3] in [0, 1] (0 for patch tokens).
        """
        cfg = self.config
        v, g, pp = cfg.codebook_size, cfg.n_global, cfg.patch_size**2
        position = torch.full((v,), -1, dtype=torch.long)
        position[g:] = torch.arange(cfg.n_patches).repeat_interleave(cfg.n_shapes)
        mask = torch.zeros(v, pp)
        mask[g:] = self.shapes.reshape(-1, pp)
        tile = torch.zeros(v, pp * 3)
        tile[:g] = self.tiles.reshape(cfg.n_tiles, -1).repeat_interleave(cfg.n_colours, 0) / 255
        colour = torch.zeros(v, 3)
        colour[:g] = self.colours.repeat(cfg.n_tiles, 1) / 255
        return {"position": position, "mask": mask, "tile": tile, "colour": colour}

    @torch.no_grad()
    def render_codes(self, codes: Sequence[Tensor]) -> Tensor:
        """Draw codes by their centroids -> uint8 [B, H, W, 3]. Each list must start with its image token."""
        from pigeon_utils.backbone import pad_codes

        cfg = self.config
        ids, valid = pad_codes(codes)
        g = ids[:, 0].clamp(max=cfg.n_global - 1)
        tile, colour = g // cfg.n_colours, self.colours[g % cfg.n_colours]  # [B], [B, 3]
        out = self.tiles[tile][:, None].expand(-1, cfg.n_patches, -1, -1, -1).clone()  # [B, n, p, p, 3]
        is_patch = valid & (ids >= cfg.n_global)
        b_idx, t_idx = is_patch.nonzero(as_tuple=True)
        rel = ids[b_idx, t_idx] - cfg.n_global
        pos, shape = rel // cfg.n_shapes, rel % cfg.n_shapes
        m = (self.shapes[pos, shape] > 0.5).reshape(-1, cfg.patch_size, cfg.patch_size, 1)
        out[b_idx, pos] = torch.where(m, colour[b_idx][:, None, None], out[b_idx, pos])
        return _unpatchify(out, cfg.grid).round().clamp(0, 255).to(torch.uint8)

    # ---------------------------------------------------------------------------------------- files
    def save_pretrained(self, folder: Path) -> None:
        folder = Path(folder)
        write_json({"class": "ToyVisualTokenizer", **asdict(self.config),
                    "codebook_size": self.codebook_size}, folder / "config.json")
        write_safetensors({"tiles": self.tiles, "colours": self.colours, "shapes": self.shapes},
                          folder / "model.safetensors")

    @classmethod
    def from_pretrained(cls, folder: Path) -> "ToyVisualTokenizer":
        folder = Path(folder)
        raw = read_json(folder / "config.json")
        fields = ToyTokenizerConfig.__dataclass_fields__
        cfg = ToyTokenizerConfig(**{k: v for k, v in raw.items() if k in fields})
        t = read_safetensors(folder / "model.safetensors")
        expect = {"tiles": (cfg.n_tiles, cfg.patch_size, cfg.patch_size, 3), "colours": (cfg.n_colours, 3),
                  "shapes": (cfg.n_patches, cfg.n_shapes, cfg.patch_size**2)}
        for k, shape in expect.items():
            if k not in t or tuple(t[k].shape) != shape:
                got = tuple(t[k].shape) if k in t else "absent"
                raise CheckpointError(f"{folder / 'model.safetensors'}: damaged checkpoint file (tensor {k!r}: "
                                      f"expected shape {shape}, got {got})")
        return cls(cfg, t["tiles"], t["colours"], t["shapes"])
