"""Synthetic anomalies: exact masks, attention-guided placement, baselines, Poisson on real X-rays."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from apmask_lib.finetune.anomalies import (KINDS, MIN_MEAN_DIFF, PIXEL_TOL, anomaly_batch, attention_distribution, color_jitter,
                                  is_gray, make_anomaly, poisson_paste, sample_point, transform_patch)
from apmask_lib.data import build_dataset, read_image, resize_image

SIZE = 128


@pytest.fixture(scope="module")
def bottles(mvtec_root):
    ds = build_dataset("mvtec", mvtec_root, "bottle")
    return [resize_image(ds.image(s), SIZE) for s in ds.train[:4]]


@pytest.fixture(scope="module")
def xrays(nih_root):
    paths = sorted((nih_root / "images").glob("*.png"))[:3]
    return [resize_image(read_image(p), 224) for p in paths]


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a3, b3 = (a[..., None] if a.ndim == 2 else a), (b[..., None] if b.ndim == 2 else b)
    return np.abs(a3.astype(np.int16) - b3.astype(np.int16)).max(axis=-1)


def _check_exact(img: np.ndarray, out: np.ndarray, mask: np.ndarray) -> None:
    """The contract: uint8 like the input, bool mask, non-empty, mask == changed pixels, every
    labelled pixel changed by more than PIXEL_TOL."""
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert mask.dtype == bool and mask.shape == img.shape[:2]
    assert mask.any()
    d = _diff(out, img)
    np.testing.assert_array_equal(mask, d > 0)
    assert d[mask].min() > PIXEL_TOL


def _corner_attention(n: int = 16, cells: int = 8) -> np.ndarray:
    a = np.zeros((n, n))
    a[:cells, :cells] = 1.0
    return a


# ----------------------------------------------------------------------------- distribution
def test_attention_distribution():
    a = np.random.default_rng(0).random((14, 14))
    p = attention_distribution(a, (100, 120))
    assert p.shape == (100, 120) and p.min() >= 0 and math.isclose(p.sum(), 1.0, rel_tol=1e-9)
    # standardised: the scale of the attention does not matter, the ranking does
    np.testing.assert_allclose(attention_distribution(a * 37 + 5, (100, 120)), p, rtol=1e-6, atol=1e-12)
    # peak of the map -> peak of the distribution (same cell)
    r, c = np.unravel_index(a.argmax(), a.shape)
    pr, pc = np.unravel_index(attention_distribution(a, (140, 140), temperature=0.1).argmax(), (140, 140))
    assert abs(pr // 10 - r) <= 1 and abs(pc // 10 - c) <= 1
    # constant attention and T -> infinity give the uniform distribution
    np.testing.assert_allclose(attention_distribution(np.ones((4, 4)), (8, 8)), 1 / 64)
    assert attention_distribution(a, (28, 28), temperature=1e6).std() < 1e-6
    with pytest.raises(ValueError):
        attention_distribution(np.ones(5), (8, 8))


@pytest.mark.slow
def test_paste_centres_follow_attention():
    """Attention on the top-left quadrant: sampled centres land there with the distribution's
    mass (binomial bound), far more often than the 1/4 of a uniform draw."""
    shape = (224, 224)
    for temperature in (1.0, 0.5):
        p = attention_distribution(_corner_attention(), shape, temperature)
        mass = p[:112, :112].sum()
        rng = np.random.default_rng(1)
        pts = np.array([sample_point(p, rng) for _ in range(1000)])
        hits = np.mean((pts[:, 0] < 112) & (pts[:, 1] < 112))
        assert abs(hits - mass) < 4 * math.sqrt(mass * (1 - mass) / 1000), (hits, mass)
        assert mass > 0.7
    # T -> infinity: quadrant counts consistent with uniform (chi-square)
    p = attention_distribution(_corner_attention(), shape, temperature=1e6)
    rng = np.random.default_rng(2)
    pts = np.array([sample_point(p, rng) for _ in range(800)])
    counts = np.bincount((pts[:, 0] >= 112) * 2 + (pts[:, 1] >= 112), minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_attention_anomalies_land_where_attention_is(bottles):
    """End to end: the centroid of the pasted region falls in the attended quadrant."""
    img = bottles[0]
    att = _corner_attention()
    rng = np.random.default_rng(3)
    inside = 0
    n = 60
    for _ in range(n):
        out, m = make_anomaly(img, "attention", rng, attention=att, temperature=0.5)
        ys, xs = np.nonzero(m)
        inside += (ys.mean() < SIZE / 2) and (xs.mean() < SIZE / 2)
    assert inside / n > 0.75
    assert stats.binomtest(inside, n, 0.25, alternative="greater").pvalue < 1e-10


def test_cut_comes_from_the_salient_region():
    """With a distinct source, the pasted content comes from the source's attended quadrant."""
    H = 128
    src = np.zeros((H, H, 3), np.uint8)
    src[..., 2] = 255                      # blue everywhere ...
    src[:64, :64] = (255, 0, 0)            # ... red where the source attention is
    dst = np.full((H, H, 3), (90, 160, 90), np.uint8)  # colour: a grey target would turn the source grey
    rng = np.random.default_rng(4)
    red = []
    for _ in range(30):
        out, m = make_anomaly(dst, "attention", rng, attention=np.ones((8, 8)), source=src,
                              source_attention=_corner_attention(8, 4), temperature=0.5, jitter=0.0, max_angle=0)
        px = out[m].astype(int)
        red.append(np.mean(px[:, 0] > px[:, 2]))
    assert np.mean(red) > 0.75


# ----------------------------------------------------------------------------- exact masks
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("poisson", [False, True])
def test_mask_is_exactly_the_changed_pixels(bottles, kind, poisson):
    rng = np.random.default_rng(5)
    att = np.random.default_rng(6).random((8, 8))
    visible = 0
    for i in range(6):
        img, src = bottles[i % 4], bottles[(i + 1) % 4]
        out, m = make_anomaly(img, kind, rng, attention=att, source=src, poisson=poisson)
        _check_exact(img, out, m)
        visible += _diff(out, img)[m].mean() >= MIN_MEAN_DIFF
    assert visible >= 5  # the fallback (most visible after max_tries) is rare


def test_plain_attention_patch_geometry(bottles):
    """No rotation/rescale/jitter: the mask lies in one rectangle of side 0.1..0.4 of the image."""
    rng = np.random.default_rng(7)
    for i in range(10):
        img = bottles[i % 4]
        out, m = make_anomaly(img, "attention", rng, attention=np.ones((8, 8)), max_angle=0, scale_range=(1, 1),
                              jitter=0.0)
        ys, xs = np.nonzero(m)
        assert ys.max() - ys.min() + 1 <= math.ceil(0.4 * SIZE) and xs.max() - xs.min() + 1 <= math.ceil(0.4 * SIZE)


def test_transform_patch_footprint():
    patch = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    rot, foot = transform_patch(patch, angle=30, scale=1.5)
    h, w = 30, 60
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    assert abs(foot.shape[1] - (w * c + h * s)) <= 2 and abs(foot.shape[0] - (w * s + h * c)) <= 2
    assert abs(foot.sum() - h * w) / (h * w) < 0.05
    same, f0 = transform_patch(patch, 0, 1.0)
    np.testing.assert_array_equal(same, patch)
    assert f0.all()


def test_invisible_candidates_are_redrawn():
    """A mostly flat image: cut-paste of flat onto flat is invisible and must be redrawn; a
    constant image cannot hold a visible cut-paste at all and is a clear error."""
    img = np.full((128, 128, 3), 90, np.uint8)
    img[40:80, 40:80] = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    rng = np.random.default_rng(8)
    for _ in range(10):
        out, m = make_anomaly(img, "cutpaste", rng, jitter=0.0, max_tries=50)
        _check_exact(img, out, m)
        assert _diff(out, img)[m].mean() >= MIN_MEAN_DIFF
    with pytest.raises(RuntimeError, match="visible"):
        make_anomaly(np.full((64, 64, 3), 90, np.uint8), "cutpaste", rng, jitter=0.0, max_tries=5)


# ----------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("kind", KINDS)
def test_batches_are_valid_triples(bottles, kind):
    rng = np.random.default_rng(9)
    atts = [np.random.default_rng(i).random((8, 8)) for i in range(4)]
    ims, masks, labels = anomaly_batch(bottles, rng, kind, 0.5, attentions=atts)
    assert ims.dtype == np.uint8 and ims.shape == (4, SIZE, SIZE, 3)
    assert masks.dtype == bool and masks.shape == (4, SIZE, SIZE)
    assert labels.dtype == np.int64 and sorted(labels.tolist()) == [0, 0, 1, 1]
    assert not masks[labels == 0].any()
    assert all(masks[i].any() for i in np.nonzero(labels)[0])
    area = masks[labels == 1].reshape(2, -1).mean(axis=1)
    if kind == "cutpaste":
        assert area.max() <= 0.15 + 1e-6
    if kind == "scar":
        assert masks[labels == 1].reshape(2, -1).sum(axis=1).max() <= 16 * 25 * (SIZE / 256) ** 2 * 1.2 + 8
    flags = [True, False, True, True]
    _, m2, l2 = anomaly_batch(bottles, rng, kind, flags, attentions=atts)
    assert l2.tolist() == [1, 0, 1, 1] and not m2[1].any()


def test_fpi_is_a_convex_combination(bottles):
    """Inside the mask x' - x = α (x_src - x) for one α per patch (up to rounding)."""
    img, src = bottles[0], bottles[2]
    rng = np.random.default_rng(10)
    for _ in range(5):
        out, m = make_anomaly(img, "fpi", rng, source=src)
        d = out[m].astype(float) - img[m]
        e = src[m].astype(float) - img[m]
        alpha = (d * e).sum() / (e * e).sum()
        assert 0 < alpha <= 1 + 1e-6
        assert np.abs(d - alpha * e).max() <= 1.0 + 1e-6


def test_nsa_and_fpi_need_a_source(bottles):
    with pytest.raises(ValueError, match="source"):
        make_anomaly(bottles[0], "nsa", np.random.default_rng(0))
    with pytest.raises(ValueError, match="attention"):
        make_anomaly(bottles[0], "attention", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown anomaly kind"):
        make_anomaly(bottles[0], "dream", np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        make_anomaly(bottles[0].astype(np.float32), "cutpaste", np.random.default_rng(0))


def test_object_mask_restricts_nsa(bottles):
    obj = np.zeros((SIZE, SIZE), bool)
    obj[80:, 80:] = True
    rng = np.random.default_rng(11)
    for _ in range(8):
        out, m = make_anomaly(bottles[1], "nsa", rng, source=bottles[3], object_mask=obj, patch_range=(0.1, 0.15))
        ys, xs = np.nonzero(m)
        assert ys.mean() > 64 and xs.mean() > 64


def test_seeded_output_is_reproducible(bottles):
    a = make_anomaly(bottles[0], "attention", np.random.default_rng(12), attention=np.ones((8, 8)), poisson=True)
    b = make_anomaly(bottles[0], "attention", np.random.default_rng(12), attention=np.ones((8, 8)), poisson=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_color_jitter(bottles):
    rng = np.random.default_rng(13)
    np.testing.assert_array_equal(color_jitter(bottles[0], rng, 0.0), bottles[0])
    gray = np.repeat(bottles[0][..., :1], 3, axis=2)
    assert is_gray(color_jitter(gray, rng, 0.3))
    assert not np.array_equal(color_jitter(bottles[0], rng, 0.3), bottles[0])


# ----------------------------------------------------------------------------- Poisson, X-rays
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["attention", "cutpaste", "scar", "nsa"])
@pytest.mark.parametrize("blend", ["normal", "mixed"])
def test_poisson_on_real_xrays(xrays, kind, blend):
    assert all(is_gray(x) for x in xrays)
    rng = np.random.default_rng(14)
    att = np.random.default_rng(15).random((16, 16))
    for i in range(3):
        img, src = xrays[i], xrays[(i + 1) % 3]
        out, m = make_anomaly(img, kind, rng, attention=att, source=src, poisson=True, blend=blend)
        _check_exact(img, out, m)
        assert is_gray(out)
        # 8-bit single-channel input in, single channel out
        out2, m2 = make_anomaly(img[..., 0], kind, rng, attention=att, source=src[..., 0], poisson=True, blend=blend)
        assert out2.ndim == 2
        _check_exact(img[..., 0], out2, m2)


def test_poisson_patches_touching_the_border(xrays):
    """Attention on the corner cell: pastes hang over the border; seamlessClone must still work."""
    att = np.zeros((16, 16))
    att[0, 0] = 1.0
    rng = np.random.default_rng(16)
    near = 0
    for i in range(8):
        img = xrays[i % 3]
        out, m = make_anomaly(img, "attention", rng, attention=att, source=xrays[(i + 1) % 3], poisson=True,
                              blend="mixed", temperature=0.2)
        _check_exact(img, out, m)
        ys, xs = np.nonzero(m)
        near += ys.min() <= 6 and xs.min() <= 6   # Poisson pins the 1-px frame and fades towards it
    assert near >= 6


@pytest.mark.parametrize("where", ["top", "left", "bottom-right", "all"])
def test_poisson_paste_leaves_outside_untouched(xrays, where):
    img = xrays[0]
    canvas = np.full_like(img, 255)
    foot = np.zeros(img.shape[:2], bool)
    region = {"top": (slice(0, 40), slice(100, 160)), "left": (slice(50, 90), slice(0, 30)),
              "bottom-right": (slice(180, None), slice(190, None)), "all": (slice(None), slice(None))}[where]
    foot[region] = True
    out = poisson_paste(img, canvas, foot, "normal")
    assert out is not None
    np.testing.assert_array_equal(out[~foot], img[~foot])
    assert (_diff(out, img)[foot] > 0).mean() > 0.5


def test_poisson_paste_refuses_what_it_cannot_blend(xrays):
    img = xrays[0]
    thin = np.zeros(img.shape[:2], bool)
    thin[0:2, :] = True         # nothing left once the 1-px frame is cleared (OpenCV would raise)
    assert poisson_paste(img, np.full_like(img, 255), thin, "normal") is None


# ----------------------------------------------------------------------------- the registry of kinds
def test_the_registry_lists_the_five_kinds_in_config_order():
    from apmask_lib import config
    from apmask_lib.finetune.anomalies import REGISTRY, get_kind, needs_attention, needs_source, registered_kinds

    assert registered_kinds() == KINDS == config.ANOMALY_KINDS == ("attention", "cutpaste", "scar", "nsa", "fpi")
    assert all(get_kind(k) is REGISTRY[k] and REGISTRY[k].name == k for k in KINDS)
    assert [k for k in KINDS if needs_source(k)] == ["nsa", "fpi"]
    assert [k for k in KINDS if needs_attention(k)] == ["attention"]
    assert [k for k in KINDS if get_kind(k).always_poisson] == ["nsa"]


def test_an_unknown_kind_names_the_known_ones(bottles):
    from apmask_lib.finetune.anomalies import get_kind, needs_source

    known = "choose from attention, cutpaste, scar, nsa, fpi"
    for call in (lambda: make_anomaly(bottles[0], "sticker", np.random.default_rng(0)),
                 lambda: anomaly_batch(bottles[:2], np.random.default_rng(0), "sticker", 1.0),
                 lambda: get_kind("sticker"), lambda: needs_source("sticker")):
        with pytest.raises(ValueError, match=f"unknown anomaly kind 'sticker'; {known}$"):
            call()


@pytest.fixture
def scratch_registry():
    """The registry as it was after the test (kinds registered by the test are dropped)."""
    from apmask_lib.finetune.anomalies import REGISTRY

    before = dict(REGISTRY)
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(before)


def test_a_sixth_kind_is_one_registered_class(bottles, scratch_registry):
    """A new kind defined here alone (no other file changed) serves make_anomaly, anomaly_batch and
    the training batches by name, under the same visibility rules."""
    from apmask_lib.finetune.anomalies import AnomalyKind, register
    from apmask_lib.finetune.batches import SyntheticBatches

    @register("invert")
    class Invert(AnomalyKind):
        """An inverted square of 12 px at a uniform place."""

        def propose(self, scene, rng, poisson):
            (H, W), s = scene.shape, 12
            y, x = int(rng.integers(H - s)), int(rng.integers(W - s))
            out = scene.image.copy()
            out[y:y + s, x:x + s] = 255 - out[y:y + s, x:x + s]
            foot = np.zeros(scene.shape, bool)
            foot[y:y + s, x:x + s] = True
            return out, foot

    assert "invert" in scratch_registry and Invert.name == "invert"
    out, mask = make_anomaly(bottles[0], "invert", np.random.default_rng(1))
    _check_exact(bottles[0], out, mask)
    assert mask.sum() <= 144
    ims, masks, labels = anomaly_batch(bottles, np.random.default_rng(2), "invert", 0.5)
    assert sorted(labels.tolist()) == [0, 0, 1, 1] and all(masks[i].any() for i in np.nonzero(labels)[0])
    batch = SyntheticBatches(np.stack(bottles), None, 4, seed=0, kind="invert")[0]
    assert batch["labels"].sum() == 2 and batch["masks"].any()
    with pytest.raises(ValueError, match="already registered"):
        register("invert")(Invert)
    with pytest.raises(TypeError, match="AnomalyKind"):
        register("plain")(object)
