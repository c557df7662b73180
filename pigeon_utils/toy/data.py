"""The toy world's datasets: `toy-sticker` (mirrors SER-30K) and `toy-poster` (mirrors MovieLens posters).

Every image is drawn procedurally from known factors, so later stages can measure what a generated image
kept of the user's taste and of the reference's meaning:

* a **semantic** factor — the glyph (circle, star, heart ...), standing for a sticker's emotion or a
  movie's genre;
* **style** factors — foreground colour, background pattern and stroke (filled / outline), which carry a
  user's taste;
* jitter in glyph size and position.

Backgrounds are grey patterns with an 8-pixel period, so every background 8×8 patch of an image is the
same tile; the toy visual tokenizer keeps the patches that differ from it (like LaVIT's token selector keeps
informative patches).

The datasets are written in the project's safe format (JSON / PNG, see :mod:`pigeon_utils.data`), with the
same logical content as the upstream ``processed_seq`` folders, plus ``factors.json`` (toy only) recording
each image's factors. ``write_upstream=True`` additionally writes the upstream pickled ``.npy`` files, which
the tests use to exercise the real-format reader and the converter.

Rebuild with ``python -m pigeon_utils toy-data --out dataset`` (or ``python -m pigeon_utils.toy.data --out dataset``;
deterministic from ``--seed``). Each dataset folder is written beside its final name and swapped in whole.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from tqdm.auto import tqdm

from pigeon_utils.atomic import atomic_dir, atomic_write_text

IMAGE_SIZE = 64
TILE = 8

GLYPHS = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "moon")
COLOURS = {
    "red": (214, 39, 40),
    "orange": (245, 130, 20),
    "yellow": (222, 200, 20),
    "green": (44, 160, 44),
    "cyan": (23, 190, 207),
    "blue": (31, 80, 220),
    "purple": (148, 60, 200),
    "pink": (240, 90, 170),
}
PATTERNS = ("plain", "stripes", "dots", "grid")
STROKES = ("filled", "outline")
STYLE_FACTORS = ("colour", "pattern", "stroke")

# SER-30K's seven emotion labels -> the glyph that stands for each in the toy.
EMOTION_GLYPH = {
    "Neutral": "circle",
    "Happiness": "heart",
    "Sadness": "moon",
    "Anger": "cross",
    "Surprise": "star",
    "Fear": "triangle",
    "Disgust": "diamond",
}
# Eight MovieLens genres -> glyph.
GENRE_GLYPH = {
    "Action": "cross",
    "Comedy": "star",
    "Drama": "circle",
    "Horror": "triangle",
    "Romance": "heart",
    "Sci-Fi": "diamond",
    "Thriller": "moon",
    "Animation": "square",
}


@dataclass(frozen=True)
class ToyFactors:
    """The factors an image is drawn from. `size` is the glyph's diameter in pixels, `dx`/`dy` its offset."""

    glyph: str
    colour: str
    pattern: str
    stroke: str
    size: int = 32
    dx: int = 0
    dy: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("glyph", GLYPHS), ("colour", tuple(COLOURS)), ("pattern", PATTERNS),
                              ("stroke", STROKES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"ToyFactors.{name}={value!r}: expected one of {allowed}")

    @property
    def style(self) -> tuple[str, str, str]:
        return (self.colour, self.pattern, self.stroke)

    def caption(self) -> str:
        """Full description of every factor (used to train the toy CLIP and LMM)."""
        return f"a {self.stroke} {self.colour} {self.glyph} on a {self.pattern} background"


def sticker_semantics(emotion: str) -> str:
    """The toy sticker's target-semantics text (``sticker_semantics``): what the sticker means, its emotion.

    It does not name the glyph, as SER-30K's semantics describe what a sticker means rather than how it is drawn:
    which glyph an emotion is drawn as is something the toy CLIP learns from images (``clip_semantics`` in the
    build), so reference CS rewards the glyph the reference shows.
    """
    if emotion not in EMOTION_GLYPH:
        raise ValueError(f"emotion {emotion!r}: expected one of {tuple(EMOTION_GLYPH)}")
    return f"a sticker showing {emotion.lower()}"


def poster_semantics(genre: str) -> str:
    """The toy poster's target-semantics text (``movie_semantics``): its genre and glyph, no style."""
    return f"a poster of a {genre.lower()} movie showing a {GENRE_GLYPH[genre]}"


def semantics_texts(glyph: str) -> list[str]:
    """Every toy semantics text an image with `glyph` can have (sticker and poster forms)."""
    return ([sticker_semantics(e) for e, g in EMOTION_GLYPH.items() if g == glyph]
            + [poster_semantics(n) for n, g in GENRE_GLYPH.items() if g == glyph])


# ----------------------------------------------------------------------------------------------- drawing
def _background_tile(pattern: str) -> np.ndarray:
    t = np.empty((TILE, TILE), dtype=np.uint8)
    if pattern == "plain":
        t[:] = 236
    elif pattern == "stripes":
        t[:] = 226
        t[0:2, :] = 168
    elif pattern == "dots":
        t[:] = 232
        t[3:5, 3:5] = 140
    elif pattern == "grid":
        t[:] = 214
        t[0, :] = 150
        t[:, 0] = 150
    else:  # validated by ToyFactors
        raise ValueError(pattern)
    return np.repeat(t[:, :, None], 3, axis=2)


_TILES = {p: _background_tile(p) for p in PATTERNS}


def _glyph_polygon(glyph: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if glyph == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if glyph == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if glyph == "diamond":
        return [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)]
    if glyph == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if glyph == "cross":
        w = r * 0.36
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    if glyph == "heart":
        pts = []
        for k in range(32):
            t = 2 * math.pi * k / 32
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 17, cy - y * r / 17 - r * 0.05))
        return pts
    raise ValueError(f"no polygon for glyph {glyph!r}")


def render(f: ToyFactors, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw one toy image (RGB, `size`×`size`) from its factors. Deterministic, no anti-aliasing.

    The glyph is drawn as a binary mask; an outline glyph is that mask minus its erosion, so every glyph
    has the same stroke width whatever its shape.
    """
    reps = size // TILE
    img = Image.fromarray(np.tile(_TILES[f.pattern], (reps, reps, 1)), "RGB")
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    cx, cy, r = size / 2 + f.dx, size / 2 + f.dy, f.size / 2
    if f.glyph in ("circle", "moon"):
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if f.glyph == "moon":
            off = r * 0.55
            d.ellipse([cx - r + off, cy - r - off * 0.3, cx + r + off, cy + r - off * 0.3], fill=0)
    else:
        d.polygon(_glyph_polygon(f.glyph, cx, cy, r), fill=255)
    if f.stroke == "outline":
        width = max(2, round(f.size / 11))
        mask = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(2 * width + 1)))
    img.paste(COLOURS[f.colour], mask=mask)
    return img


def _render_array(f: ToyFactors) -> np.ndarray:
    return np.asarray(render(f))


def render_many(factors: list[ToyFactors], workers: int = 1) -> np.ndarray:
    """Render many toy images -> uint8 [n, 64, 64, 3]; identical whatever `workers` is.

    With `workers` > 1 on Linux, large batches are drawn by forked worker processes (PIL draws one image at a
    time and holds the GIL).
    """
    if not factors:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    if workers > 1 and len(factors) >= 2000 and sys.platform == "linux":
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
            return np.stack(list(ex.map(_render_array, factors, chunksize=500)))
    return np.stack([_render_array(f) for f in factors])


def random_factors(rng: np.random.Generator, glyph: str, colour: str, pattern: str, stroke: str) -> ToyFactors:
    """Factors with the toy's size / position jitter."""
    return ToyFactors(glyph, colour, pattern, stroke, size=int(rng.integers(24, 39)),
                      dx=int(rng.integers(-6, 7)), dy=int(rng.integers(-6, 7)))


# ---------------------------------------------------------------------------------------- generation
TITLE_ADJ = ("Silent", "Crimson", "Last", "Hidden", "Broken", "Golden", "Midnight", "Lost", "Frozen", "Wild",
             "Distant", "Electric", "Quiet", "Burning", "Forgotten", "Secret")
TITLE_NOUN = ("Harbor", "Garden", "Signal", "River", "Empire", "Mirror", "Station", "Horizon", "Letter",
              "Orchard", "Machine", "Summer", "Kingdom", "Voyage", "Canyon", "Promise")
INTRO_VERB = {
    "Action": "races against time to stop", "Comedy": "stumbles into", "Drama": "faces the truth about",
    "Horror": "is haunted by", "Romance": "falls in love during", "Sci-Fi": "discovers a signal from",
    "Thriller": "uncovers a conspiracy behind", "Animation": "goes on an adventure through",
}
INTRO_WHO = ("a young pilot", "two old friends", "a retired detective", "a small-town teacher", "a robot",
             "a family", "a stubborn chef", "an orphaned girl")


def _split_windows(seqs: dict[int, dict[int, list[int]]], rng: np.random.Generator):
    from pigeon_utils.windows import build_windows, split_windows

    windows = build_windows(seqs)
    return split_windows(windows, ratios=(0.8, 0.1, 0.1), seed=int(rng.integers(2**31)))


def _off_style(rng: np.random.Generator, theme: tuple[str, str, str], keep: float) -> tuple[str, str, str]:
    """The theme's (colour, pattern, stroke), each factor swapped with probability 1 − `keep` for a uniformly
    drawn different value."""
    out = []
    for value, allowed in zip(theme, (tuple(COLOURS), PATTERNS, STROKES)):
        if rng.random() >= keep:
            others = [a for a in allowed if a != value]
            value = others[int(rng.integers(len(others)))]
        out.append(value)
    return out[0], out[1], out[2]


def make_sticker(out: Path, seed: int = 0, n_themes: int = 64, stickers_per_theme: tuple[int, int] = (60, 90),
                 style_keep: float = 0.75, write_upstream: bool = False) -> Path:
    """Write `toy-sticker`: each user is a sticker theme with its own style, whose stickers cover 3–5 emotions.

    A sticker keeps each of its theme's style factors (colour, pattern, stroke) with probability `style_keep` and
    otherwise has a different value: a theme has a house style that most, not all, of its stickers follow, so a
    target sticker can differ from what its history shows — what the α_r trade-off is about.
    """
    if not 0.0 <= style_keep <= 1.0:
        raise ValueError(f"style_keep={style_keep}: expected a probability in [0, 1]")
    n_styles = len(COLOURS) * len(PATTERNS) * len(STROKES)
    if not 1 <= n_themes <= n_styles:
        raise ValueError(f"n_themes={n_themes}: expected 1..{n_styles} (one distinct house style per theme)")
    rng = np.random.default_rng(seed)
    emotions = list(EMOTION_GLYPH)
    all_styles = [(c, p, s) for c in COLOURS for p in PATTERNS for s in STROKES]
    style_idx = rng.permutation(len(all_styles))[:n_themes]
    paths: list[str] = []
    factors: list[dict] = []
    anno: dict[int, dict] = {}
    semantics: list[str] = []
    user_dict: dict[int, dict[int, list[int]]] = {}
    theme_names: dict[str, int] = {}
    file_map: dict[str, int] = {}
    images: list[tuple[str, ToyFactors]] = []
    for gid in range(n_themes):
        colour, pattern, stroke = all_styles[style_idx[gid]]
        n = int(rng.integers(stickers_per_theme[0], stickers_per_theme[1] + 1))
        theme_emotions = list(rng.choice(emotions, size=int(rng.integers(3, 6)), replace=False))
        name = f"theme_{gid:03d}"
        theme_names[name] = gid
        iids = []
        for k in range(n):
            emo = str(theme_emotions[int(rng.integers(len(theme_emotions)))])
            f = random_factors(rng, EMOTION_GLYPH[emo], *_off_style(rng, (colour, pattern, stroke), style_keep))
            iid = len(paths)
            rel = f"{name}/{k:03d}.png"
            paths.append(rel)
            file_map[rel] = iid
            factors.append(asdict(f))
            anno[iid] = {"emo": emo, "text": ""}
            semantics.append(sticker_semantics(emo))
            images.append((rel, f))
            iids.append(iid)
        user_dict[gid] = {gid: [int(i) for i in rng.permutation(iids)]}
    splits = _split_windows(user_dict, rng)
    root = out / "toy-sticker"
    files = {
        "all_image_paths": paths,
        "mapped_anno_dict": anno,
        "mapped_user_dict": user_dict,
        "sticker_semantics": semantics,
        **splits,
        "map/theme_map": theme_names,
        "map/image_map": file_map,
    }
    _write_dataset(root, "Images", images, files, factors, write_upstream)
    return root


def make_poster(out: Path, seed: int = 0, n_movies: int = 256, n_users: int = 96,
                seq_len: tuple[int, int] = (18, 34), write_upstream: bool = False) -> Path:
    """Write `toy-poster`: movies with their own poster styles; users prefer some colours, a pattern, a stroke
    and some genres, and their interaction sequences are sampled accordingly, so history carries taste."""
    rng = np.random.default_rng(seed + 1)
    genres = list(GENRE_GLYPH)
    colours, paths, factors, semantics = list(COLOURS), [], [], []
    movies: dict[int, dict] = {}
    movie_ids = sorted(int(x) for x in rng.choice(np.arange(1, 200000), size=n_movies, replace=False))
    id_map = {}
    images = []
    n_titles = len(TITLE_ADJ) * len(TITLE_NOUN)
    if n_movies > n_titles:
        raise ValueError(f"n_movies={n_movies} exceeds the {n_titles} distinct toy titles")
    title_idx = rng.permutation(n_titles)[:n_movies]
    m_genre, m_style = [], []
    for iid, mid in enumerate(movie_ids):
        g = genres[int(rng.integers(len(genres)))]
        extra = [x for x in rng.choice(genres, size=int(rng.integers(0, 3)), replace=False) if x != g]
        a, b = divmod(int(title_idx[iid]), len(TITLE_NOUN))
        title = f"The {TITLE_ADJ[a]} {TITLE_NOUN[b]}"
        year = int(rng.integers(1950, 2021))
        f = random_factors(rng, GENRE_GLYPH[g], colours[int(rng.integers(len(colours)))],
                           PATTERNS[int(rng.integers(len(PATTERNS)))], STROKES[int(rng.integers(len(STROKES)))])
        who = INTRO_WHO[int(rng.integers(len(INTRO_WHO)))]
        movies[iid] = {"title": f"{title} ({year})", "genres": "|".join([g, *map(str, extra)]),
                       "intro": f"{who.capitalize()} {INTRO_VERB[g]} {title.lower()}."}
        rel = f"{mid}.png"
        paths.append(rel)
        id_map[str(mid)] = iid
        factors.append(asdict(f))
        semantics.append(poster_semantics(g))
        images.append((rel, f))
        m_genre.append(genres.index(g))
        m_style.append((colours.index(f.colour), PATTERNS.index(f.pattern), STROKES.index(f.stroke)))
    m_genre_a, m_style_a = np.array(m_genre), np.array(m_style)
    user_seq: dict[int, dict[int, list[int]]] = {}
    tastes: dict[int, dict] = {}
    user_ids = sorted(int(x) for x in rng.choice(np.arange(1, 1000), size=n_users, replace=False))
    user_map = {}
    for uid, orig in enumerate(user_ids):
        pref_c = rng.choice(len(colours), size=2, replace=False)
        pref_p = int(rng.integers(len(PATTERNS)))
        pref_s = int(rng.integers(len(STROKES)))
        pref_g = rng.choice(len(genres), size=3, replace=False)
        logit = (2.6 * np.isin(m_style_a[:, 0], pref_c) + 1.6 * (m_style_a[:, 1] == pref_p)
                 + 1.2 * (m_style_a[:, 2] == pref_s) + 1.0 * np.isin(m_genre_a, pref_g))
        p = np.exp(logit)
        p /= p.sum()
        n = int(rng.integers(seq_len[0], seq_len[1] + 1))
        seq = [int(i) for i in rng.choice(n_movies, size=n, replace=False, p=p)]
        gid = int(pref_g[0])
        user_seq[uid] = {gid: seq}
        user_map[str(orig)] = uid
        tastes[uid] = {"colours": [colours[i] for i in pref_c], "pattern": PATTERNS[pref_p],
                       "stroke": STROKES[pref_s], "genres": [genres[i] for i in pref_g]}
    splits = _split_windows(user_seq, rng)
    root = out / "toy-poster"
    files = {
        "all_image_paths": paths,
        "mapped_movies": movies,
        "user_seq_dict": user_seq,
        "movie_semantics": semantics,
        **splits,
        "map/movie_id_map": id_map,
        "map/user_id_map": user_map,
    }
    _write_dataset(root, "poster", images, files, factors, write_upstream,
                   extra={"toy_user_tastes.json": json.dumps({str(k): v for k, v in tastes.items()}, indent=1)})
    return root


def _write_dataset(root: Path, image_dir: str, images, files: dict, factors: list[dict], write_upstream: bool,
                   extra: dict[str, str] | None = None) -> None:
    """Write one dataset folder (images, ``processed_seq`` files, ``factors.json``, `extra` text files by name),
    replacing `root` as a whole (:func:`~pigeon_utils.atomic.atomic_dir`)."""
    from pigeon_utils.data_formats import save_safe, save_upstream_npy

    def write(tmp: Path) -> None:
        data_path = tmp / "processed_seq"
        data_path.mkdir(parents=True)
        for rel, f in tqdm(images, desc=f"render {root.name}", leave=False):
            p = tmp / image_dir / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            render(f).save(p, optimize=True)
        for name, obj in files.items():
            save_safe(data_path, name, obj)
            if write_upstream:
                save_upstream_npy(data_path / f"{name}.npy", obj)
        atomic_write_text(tmp / "factors.json", json.dumps(factors, separators=(",", ":")))
        for name, text in (extra or {}).items():
            atomic_write_text(tmp / name, text)

    atomic_dir(root, write)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build the toy datasets (toy-sticker, toy-poster).")
    ap.add_argument("--out", type=Path, default=Path("dataset"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--upstream-npy", action="store_true",
                    help="also write the upstream pickled .npy files (for exercising the real-format reader)")
    a = ap.parse_args(argv)
    for make in (make_sticker, make_poster):
        root = make(a.out, seed=a.seed, write_upstream=a.upstream_npy)
        print(f"wrote {root}")


if __name__ == "__main__":
    main()
