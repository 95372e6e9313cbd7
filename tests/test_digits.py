"""Tests of the embedded offline digits benchmark (tllab.data.digits); every cache lives under tmp_path."""

from __future__ import annotations

import numpy as np
import pytest

from tllab.data import digits
from tllab.data.digits import (
    BASE_DOMAINS,
    RECIPE_VERSION,
    DomainData,
    default_cache_dir,
    load_domain,
    parse_domain,
)

CORRUPTED = ["mnist-rot30", "mnist-colored", "mnist-inverted", "mnist-noiseblur3", "uci-colored",
             "mnist-rot45-inverted"]
SIZES = {"mnist": 5000, "uci": 1797, "mnistm": 5000, "synth": 5000}


@pytest.fixture(scope="session")
def cache(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("digits-cache")


@pytest.fixture(scope="session")
def base(cache) -> dict[str, DomainData]:
    """Every base domain built once (seed 0) into the session cache."""
    return {name: load_domain(name, seed=0, cache_dir=cache) for name in BASE_DOMAINS}


def _assert_contract(d: DomainData) -> None:
    for x, y in ((d.train_x, d.train_y), (d.test_x, d.test_y)):
        assert x.dtype == np.uint8
        assert x.ndim == 4 and x.shape[1:] == (32, 32, 3)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() <= 9
        assert set(np.unique(y)) == set(range(10))
    n = len(d.train_y) + len(d.test_y)
    assert abs(len(d.test_y) / n - 0.2) <= 0.01
    assert d.train_x.std() > 10  # not blank


def _assert_same(a: DomainData, b: DomainData) -> None:
    assert a.name == b.name
    for k in ("train_x", "train_y", "test_x", "test_y"):
        assert getattr(a, k).tobytes() == getattr(b, k).tobytes(), k


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ----------------------------------------------------------------------------- shapes, sizes, recipes


@pytest.mark.parametrize("name", BASE_DOMAINS)
def test_base_domain_contract(base, name):
    d = base[name]
    _assert_contract(d)
    assert d.name == name
    assert len(d.train_y) + len(d.test_y) == SIZES[name]


@pytest.mark.parametrize("name", CORRUPTED)
def test_corrupted_domain_contract(base, cache, name):
    d = load_domain(name, seed=0, cache_dir=cache)
    _assert_contract(d)
    assert d.name == name
    src = base[name.split("-")[0]]
    np.testing.assert_array_equal(d.train_y, src.train_y)  # same split as the base domain
    np.testing.assert_array_equal(d.test_y, src.test_y)
    assert _mad(d.test_x, src.test_x) > 1


def test_recipe_details(base):
    mnist, uci, synth, mnistm = base["mnist"], base["uci"], base["synth"], base["mnistm"]
    # grey copied to 3 channels, zero padding of 2 px (mnist) and 4 px (uci)
    for d, pad in ((mnist, 2), (uci, 4)):
        x = d.train_x
        assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])
        assert x[:, :pad].max() == 0 and x[:, -pad:].max() == 0
        assert x[:, :, :pad].max() == 0 and x[:, :, -pad:].max() == 0
        assert x[:, pad:-pad, pad:-pad].max() == 255
    # balanced classes: mnist/synth 400 train + 100 test per class
    for d in (mnist, synth, mnistm):
        assert np.bincount(d.train_y).tolist() == [400] * 10
        assert np.bincount(d.test_y).tolist() == [100] * 10
    # mnistm and synth are colour images with textured/coloured backgrounds
    for d in (mnistm, synth):
        assert np.abs(d.train_x[..., 0].astype(int) - d.train_x[..., 1]).mean() > 5
        assert d.train_x[:, 0, 0].std() > 30  # corner (background) colours vary between images
    assert np.array_equal(mnistm.test_y, mnist.test_y)  # mnistm shares the mnist split


# ----------------------------------------------------------------------------- determinism and split


@pytest.mark.parametrize("name", ["mnistm", "synth", "mnist-noiseblur3", "mnist-colored"])
def test_same_seed_is_byte_identical(base, cache, tmp_path, name):
    first = load_domain(name, seed=0, cache_dir=cache)
    again = load_domain(name, seed=0, cache_dir=tmp_path)  # rebuilt from scratch in another cache
    _assert_same(first, again)


@pytest.mark.parametrize("name", ["mnistm", "synth", "mnist-noise3", "mnist-colored"])
def test_other_seed_changes_images_not_split(base, cache, name):
    a = load_domain(name, seed=0, cache_dir=cache)
    b = load_domain(name, seed=1, cache_dir=cache)
    assert _mad(a.train_x, b.train_x) > 5
    assert _mad(a.test_x, b.test_x) > 5
    np.testing.assert_array_equal(a.train_y, b.train_y)
    np.testing.assert_array_equal(a.test_y, b.test_y)


@pytest.mark.parametrize("name", BASE_DOMAINS)
def test_split_does_not_depend_on_seed(base, cache, name):
    other = load_domain(name, seed=7, cache_dir=cache)
    np.testing.assert_array_equal(other.test_y, base[name].test_y)
    np.testing.assert_array_equal(other.train_y, base[name].train_y)
    if name in ("mnist", "uci"):  # nothing random: identical images for every seed
        _assert_same(other, base[name])


def test_mnistm_blends_the_mnist_split(base):
    """mnistm = |patch - digit| over the mnist digits in the same split and order.

    Where the digit is 255 an image shows 255 - patch, where it is 0 the patch itself; so per image the mean
    over ink pixels is about 255 minus the mean over background pixels (strong negative correlation over
    images). Misaligned digits would give a positive correlation.
    """
    mnist, mnistm = base["mnist"], base["mnistm"]
    for split in ("train", "test"):
        digit = getattr(mnist, f"{split}_x")[..., 0]
        blend = getattr(mnistm, f"{split}_x").astype(np.float64).mean(axis=-1)
        ink, back = digit == 255, digit == 0
        keep = ink.sum(axis=(1, 2)) >= 5
        ink_mean = (blend * ink).sum(axis=(1, 2))[keep] / ink.sum(axis=(1, 2))[keep]
        back_mean = (blend * back).sum(axis=(1, 2))[keep] / back.sum(axis=(1, 2))[keep]
        assert np.corrcoef(ink_mean, back_mean)[0, 1] < -0.8
        assert abs(np.median(ink_mean + back_mean) - 255) < 20


# ----------------------------------------------------------------------------- cache


def test_cache_file_is_written_and_read(tmp_path, monkeypatch):
    built = load_domain("uci-inverted", seed=3, cache_dir=tmp_path)
    folder = tmp_path / f"digits-v{RECIPE_VERSION}"
    # both the corrupted domain and its base are cached (uci has no random parts: one file for
    # every seed), and no temporary file is left behind
    assert sorted(p.name for p in folder.iterdir()) == ["uci-inverted-seed3.npz", "uci-seed0.npz"]

    def boom(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(digits, "_build_base", boom)
    monkeypatch.setattr(digits, "_apply_corruptions", boom)
    _assert_same(load_domain("uci-inverted", seed=3, cache_dir=tmp_path), built)
    _assert_same(load_domain("uci", seed=3, cache_dir=str(tmp_path)), load_domain("uci", 3, tmp_path))
    _assert_same(load_domain("uci", seed=4, cache_dir=tmp_path), load_domain("uci", 0, tmp_path))  # seed-free
    with pytest.raises(AssertionError, match="cache should have been used"):
        load_domain("mnistm", seed=4, cache_dir=tmp_path)  # not cached yet


def test_corrupted_domain_reuses_cached_base(tmp_path, monkeypatch):
    base = load_domain("uci", seed=0, cache_dir=tmp_path)
    monkeypatch.setattr(digits, "_build_base", lambda *a: pytest.fail("base rebuilt instead of cached"))
    inv = load_domain("uci-inverted", seed=0, cache_dir=tmp_path)
    np.testing.assert_array_equal(inv.test_x, 255 - base.test_x)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_cache_file_is_rebuilt(tmp_path, damage):
    good = load_domain("uci", seed=0, cache_dir=tmp_path)
    path = tmp_path / f"digits-v{RECIPE_VERSION}" / "uci-seed0.npz"
    raw = path.read_bytes()
    broken = {"truncate": raw[: len(raw) // 2], "garbage": b"not a zip file" * 100, "empty": b""}[damage]
    path.write_bytes(broken)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        rebuilt = load_domain("uci", seed=0, cache_dir=tmp_path)
    _assert_same(rebuilt, good)
    assert path.read_bytes() == raw  # the file was rewritten whole
    _assert_same(load_domain("uci", seed=0, cache_dir=tmp_path), good)


def test_cache_file_of_another_domain_is_rejected(tmp_path):
    load_domain("uci", seed=0, cache_dir=tmp_path)
    folder = tmp_path / f"digits-v{RECIPE_VERSION}"
    (folder / "uci-seed0.npz").rename(folder / "uci-seed1.npz")  # wrong content under the seed-1 name is fine
    (folder / "uci-seed1.npz").rename(folder / "uci-inverted-seed0.npz")  # but a wrong name must be detected
    with pytest.warns(RuntimeWarning, match="corrupt"):
        d = load_domain("uci-inverted", seed=0, cache_dir=tmp_path)
    assert d.name == "uci-inverted" and d.test_x[:, 0, 0].min() == 255  # padding inverted


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TLLAB_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    load_domain("uci", seed=0)  # cache_dir=None -> default_cache_dir()
    assert (tmp_path / "c" / f"digits-v{RECIPE_VERSION}" / "uci-seed0.npz").is_file()
    monkeypatch.delenv("TLLAB_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "tllab"


# ----------------------------------------------------------------------------- corruption semantics


def test_inverted_is_exact(base, cache):
    d = load_domain("mnistm-inverted", seed=0, cache_dir=cache)
    np.testing.assert_array_equal(d.train_x, 255 - base["mnistm"].train_x)
    np.testing.assert_array_equal(d.test_x, 255 - base["mnistm"].test_x)


def test_rot0_and_rot360_equal_base(base, cache):
    for name in ("mnist-rot0", "mnist-rot360"):
        d = load_domain(name, seed=0, cache_dir=cache)
        np.testing.assert_array_equal(d.train_x, base["mnist"].train_x)
        np.testing.assert_array_equal(d.test_x, base["mnist"].test_x)


def test_rotation_direction_and_ink(base, cache):
    src = base["mnist"].test_x
    r90 = load_domain("mnist-rot90", seed=0, cache_dir=cache).test_x
    assert np.abs(r90.astype(int) - np.rot90(src, 1, axes=(1, 2))).max() <= 1  # counter-clockwise
    r30 = load_domain("mnist-rot30", seed=0, cache_dir=cache).test_x
    assert abs(r30.mean() / src.mean() - 1) < 0.1  # rotation about the centre keeps the digit in frame


def test_chained_corruptions_apply_in_order(cache):
    rot = load_domain("mnist-rot45", seed=0, cache_dir=cache)
    chained = load_domain("mnist-rot45-inverted", seed=0, cache_dir=cache)
    np.testing.assert_array_equal(chained.test_x, 255 - rot.test_x)
    np.testing.assert_array_equal(chained.train_x, 255 - rot.train_x)


def test_severity_orders_damage(base, cache):
    src = base["mnist"].test_x
    mads = [_mad(load_domain(f"mnist-noiseblur{s}", seed=0, cache_dir=cache).test_x, src) for s in (1, 3, 5)]
    assert mads[0] < mads[1] < mads[2]
    assert mads[2] > 2 * mads[0]


def test_blur_and_noise_recipes(base, cache):
    src = base["mnist"].test_x.astype(np.float64)
    noise = load_domain("mnist-noise3", seed=0, cache_dir=cache).test_x.astype(np.float64)
    diff = (noise - src)[src == 128]  # no clipping at mid-grey: std = 20 * 3 (rounded)
    if diff.size < 50:
        diff = (noise - src)[(src > 80) & (src < 175)]
    assert 50 < diff.std() < 70
    blur = load_domain("mnist-blur3", seed=0, cache_dir=cache).test_x.astype(np.float64)
    assert abs(blur.mean() - src.mean()) < 1.0  # blur keeps the mean
    assert blur.max() < src.max()
    assert np.abs(np.diff(blur, axis=2)).mean() < 0.8 * np.abs(np.diff(src, axis=2)).mean()  # smoother


def test_colored_uses_two_colours_per_image(base, cache):
    d = load_domain("mnist-colored", seed=0, cache_dir=cache)
    src = base["mnist"].test_x[..., 0]
    x = d.test_x.astype(int)
    bg = x[:, 0, 0]  # padding is background
    fg_mask = src == 255
    checked = 0
    for i in range(50):
        assert (x[i][src[i] == 0] == bg[i]).all()
        fg = x[i][fg_mask[i]]
        if len(fg):  # full-intensity digit pixels all show the foreground colour
            checked += 1
            assert (fg == fg[0]).all() and np.abs(fg[0] - bg[i]).sum() >= 150
    assert checked > 25
    assert len({tuple(c) for c in bg}) > len(bg) // 2  # colours vary per image
    # independent of the label: mean background colour of each class is close to the overall mean
    per_class = np.array([bg[d.test_y == c].mean(axis=0) for c in range(10)])
    assert np.abs(per_class - bg.mean(axis=0)).max() < 40


# ----------------------------------------------------------------------------- names


def test_parse_domain():
    assert parse_domain("mnist") == ("mnist", [])
    assert parse_domain("mnist-rot45-inverted") == ("mnist", [("rot", 45.0), ("inverted", 0.0)])
    assert parse_domain("UCI-noiseblur3-colored") == ("uci", [("noiseblur", 3.0), ("colored", 0.0)])
    assert parse_domain("synth-noise5-blur1") == ("synth", [("noise", 5.0), ("blur", 1.0)])


@pytest.mark.parametrize("name, expected", [
    ("mnsit", ["'mnsit'", "did you mean 'mnist'", "mnist, uci, mnistm, synth", "rot<deg>"]),
    ("mnist-rot", ["'rot'", "0..360", "rot30"]),
    ("mnist-rot400", ["'rot400'", "0..360"]),
    ("mnist-foo", ["'foo'", "colored", "inverted", "noiseblur<s>", "mnist-rot30"]),
    ("mnist-noise9", ["'noise9'", "1..5"]),
    ("mnist-blur0", ["'blur0'", "1..5"]),
    ("mnist--inverted", ["''"]),
    ("", ["non-empty"]),
])
def test_bad_names_raise_helpful_errors(tmp_path, name, expected):
    for call in (lambda: parse_domain(name), lambda: load_domain(name, cache_dir=tmp_path)):
        with pytest.raises(ValueError) as info:
            call()
        for text in expected:
            assert text in str(info.value)
    assert not any(tmp_path.iterdir())  # nothing built or cached


def test_bad_seed(tmp_path):
    with pytest.raises(ValueError, match="non-negative"):
        load_domain("mnist", seed=-1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="non-negative"):
        load_domain("mnist", seed=1.5, cache_dir=tmp_path)
