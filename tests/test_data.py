"""Data layer: MVTec reader (real bottle + broken trees), NIH ChestX-ray14 split, demo generator, downloads."""
from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from apmask_lib.data import (AnomalyDataset, ImageReadError, Sample, build_dataset, load_mvtec, load_split_images,
                             load_split_masks, read_image, read_mask, resize_mask, verify_dataset)
from apmask_lib.data import demo, download
from apmask_lib.data.nih import load_nih, patient_in_test, read_boxes
from apmask_lib.data.verify import verify_split


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), arr)
    return path


# ----------------------------------------------------------------------------- images


def test_read_image_channel_and_depth_variants(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    _png(tmp_path / "rgb.png", rgb[:, :, ::-1])  # cv2 writes BGR
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.png"), rgb)
    rgba = np.dstack([rgb[:, :, ::-1], np.full((7, 9), 77, np.uint8)])
    _png(tmp_path / "rgba.png", rgba)
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)
    grey = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    _png(tmp_path / "grey.png", grey)
    g = read_image(tmp_path / "grey.png")
    assert g.shape == (7, 9, 3) and g.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(g[:, :, c], grey)
    g16 = (grey.astype(np.uint16) * 257)
    _png(tmp_path / "grey16.png", g16)
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png")[:, :, 0], grey)


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(ImageReadError, match=re.escape(str(tmp_path / "nope.png"))):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageReadError, match="corrupt.*" + re.escape(str(bad))):
        read_image(bad)
    good = _png(tmp_path / "ok.png", np.zeros((16, 16, 3), np.uint8) + 100)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ImageReadError, match=re.escape(str(trunc))):
        read_image(trunc)


def test_read_mask_threshold_and_size(tmp_path):
    m = np.zeros((5, 6), np.uint8)
    m[1:3, 2:4] = 255
    _png(tmp_path / "m.png", m)
    assert read_mask(tmp_path / "m.png").sum() == 4
    _png(tmp_path / "m01.png", (m > 0).astype(np.uint8))  # a 0/1 mask is also understood
    assert read_mask(tmp_path / "m01.png").sum() == 4
    with pytest.raises(ImageReadError, match=r"m\.png has size 6x5.*7x5"):
        read_mask(tmp_path / "m.png", (5, 7))
    r = resize_mask(read_mask(tmp_path / "m.png"), (10, 12))
    assert r.dtype == bool and r.shape == (10, 12) and r.sum() == 16


def test_box_masks_and_missing_pixel_gt():
    s = Sample(Path("x.png"), 1, "abnormal", boxes=((2.4, 1.0, 3.0, 2.0), (8.0, 8.0, 10.0, 10.0)))
    m = AnomalyDataset.mask(s, (10, 12))
    expect = np.zeros((10, 12), bool)
    expect[1:3, 2:5] = True
    expect[8:10, 8:12] = True  # clipped at the border
    np.testing.assert_array_equal(m, expect)
    assert not AnomalyDataset.mask(Sample(Path("g.png"), 0, "good"), (4, 4)).any()
    with pytest.raises(ValueError, match="has_pixel_gt"):
        AnomalyDataset.mask(Sample(Path("y.png"), 1, "abnormal", has_pixel_gt=False), (4, 4))


# ----------------------------------------------------------------------------- MVTec, real bottle


@pytest.mark.slow
def test_real_bottle_counts_and_masks(mvtec_root):
    ds = build_dataset("mvtec", mvtec_root, "bottle")
    assert ds.name == "mvtec/bottle"
    assert len(ds.train) == 209 and all(s.label == 0 and s.defect == "good" for s in ds.train)
    assert len(ds.test) == 83
    good = [s for s in ds.test if s.label == 0]
    bad = [s for s in ds.test if s.label == 1]
    assert len(good) == 20 and len(bad) == 63
    assert {s.defect for s in bad} == {"broken_large", "broken_small", "contamination"}
    assert sum(s.defect == "broken_large" for s in bad) == 20
    assert sum(s.defect == "broken_small" for s in bad) == 22
    assert sum(s.defect == "contamination" for s in bad) == 21
    assert all(s.mask_path is not None and s.mask_path.is_file() for s in bad)
    assert len({s.mask_path for s in bad}) == 63
    assert all(s.mask_path is None and s.has_pixel_gt for s in good)
    for s in bad:  # masks at the image's own resolution, non-empty
        img = ds.image(s)
        m = ds.mask(s, img.shape[:2])
        assert img.dtype == np.uint8 and img.shape[2] == 3 and m.shape == img.shape[:2] and m.any()
    assert not ds.mask(good[0], ds.image(good[0]).shape[:2]).any()
    arr = load_split_images(ds.test[:4], 64, progress=False)
    assert arr.shape == (4, 64, 64, 3) and arr.dtype == np.uint8
    masks = load_split_masks(bad[:3], 32, progress=False)
    assert masks.shape == (3, 32, 32) and masks.dtype == bool and masks.any(axis=(1, 2)).all()
    orig = load_split_masks(bad[:2], None, progress=False)
    assert orig[0].shape == ds.image(bad[0]).shape[:2]


@pytest.mark.slow
def test_real_bottle_verifies(mvtec_root, tmp_path):
    """Every real image and mask decodes and fits its image (the check raises otherwise); the cached
    check decodes each sample once, and on the next run takes them all from the cache."""
    ds = load_mvtec(mvtec_root, "bottle")
    n = len(ds.train + ds.val + ds.test)
    cache = tmp_path / "verified.json"
    assert verify_split(ds, cache, progress=False) == (n, 0)
    assert verify_split(ds, cache, progress=False) == (0, n)


# ----------------------------------------------------------------------------- MVTec, broken trees


def _tiny_mvtec(root: Path, category: str = "grid", size: int = 24) -> Path:
    """MVTec-shaped tree: 2 grey train images, 1 good + 2 'crack' test images with masks."""
    cat = root / category
    rng = np.random.default_rng(1)
    for i in range(2):
        _png(cat / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
    _png(cat / "test" / "good" / "000.png", rng.integers(0, 256, (size, size), dtype=np.uint8))
    for i in range(2):
        _png(cat / "test" / "crack" / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        m = np.zeros((size, size), np.uint8)
        m[2:6, 3:9] = 255
        _png(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png", m)
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"junk")  # not an image: ignored
    return root


def test_tiny_tree_loads_and_grey_becomes_rgb(tmp_path):
    root = _tiny_mvtec(tmp_path)
    ds = load_mvtec(root, "grid", verify=True)
    assert (len(ds.train), len(ds.test), sum(s.label for s in ds.test)) == (2, 3, 2)
    img = ds.image(ds.train[0])
    assert img.shape == (24, 24, 3)
    assert (img[:, :, 0] == img[:, :, 1]).all() and (img[:, :, 1] == img[:, :, 2]).all()
    crack = [s for s in ds.test if s.label][0]
    assert ds.mask(crack, (24, 24)).sum() == 24


def test_corrupt_image_is_named(tmp_path):
    root = _tiny_mvtec(tmp_path)
    bad = root / "grid" / "test" / "crack" / "001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = load_mvtec(root, "grid")  # indexing only lists files
    sample = next(s for s in ds.test if s.path == bad)
    with pytest.raises(ImageReadError, match=re.escape(str(bad))):
        ds.image(sample)
    with pytest.raises(ImageReadError, match=re.escape(str(bad))):
        load_mvtec(root, "grid", verify=True)


def test_missing_mask_is_named(tmp_path):
    root = _tiny_mvtec(tmp_path)
    mask = root / "grid" / "ground_truth" / "crack" / "001_mask.png"
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(mask))):
        load_mvtec(root, "grid")


def test_missing_ground_truth_folder(tmp_path):
    root = _tiny_mvtec(tmp_path)
    for p in (root / "grid" / "ground_truth" / "crack").iterdir():
        p.unlink()
    (root / "grid" / "ground_truth" / "crack").rmdir()
    with pytest.raises(FileNotFoundError, match="folder .*ground_truth/crack is missing"):
        load_mvtec(root, "grid")


def test_size_mismatched_mask_is_named(tmp_path):
    root = _tiny_mvtec(tmp_path)
    mask = root / "grid" / "ground_truth" / "crack" / "000_mask.png"
    _png(mask, np.zeros((12, 24), np.uint8))
    ds = load_mvtec(root, "grid")
    sample = next(s for s in ds.test if s.mask_path == mask)
    with pytest.raises(ImageReadError, match=re.escape(str(mask)) + ".*24x12.*24x24"):
        ds.mask(sample, ds.image(sample).shape[:2])
    with pytest.raises(ImageReadError, match=re.escape(str(mask))):
        verify_dataset(ds, progress=False)


def test_unknown_category_and_wrong_layout(tmp_path):
    # one level below tmp_path, so "one folder too high" searches this test's folder only (pytest's common
    # temp root holds other tests' MVTec trees)
    root = _tiny_mvtec(tmp_path / "mvtec", "bottle")
    with pytest.raises(ValueError, match=r"unknown category 'botle' \(did you mean 'bottle'\?\)"):
        build_dataset("mvtec", root, "botle")
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("imagenet", root, "bottle")
    with pytest.raises(FileNotFoundError, match="category folder not found.*holds bottle"):
        build_dataset("mvtec", root, "cable")
    with pytest.raises(FileNotFoundError, match="does not exist.*data.root"):
        build_dataset("mvtec", tmp_path / "nowhere", "bottle")
    # one folder too high: the message names the right data.root
    with pytest.raises(FileNotFoundError, match=re.escape(f"set data.root={root}")):
        load_mvtec(root.parent, "bottle")
    for p in (root / "bottle" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(FileNotFoundError, match="no training images"):
        load_mvtec(root, "bottle")
    (root / "bottle" / "train" / "good").rmdir()
    with pytest.raises(FileNotFoundError, match="wrong layout: .*train/good is missing"):
        load_mvtec(root, "bottle")


# ----------------------------------------------------------------------------- NIH ChestX-ray14


@pytest.fixture(scope="module")
def nih_truth(nih_root):
    """Expected sets computed straight from the CSVs with pandas (not through the loader)."""
    table = pd.read_csv(next(nih_root.glob("Data_Entry_2017*.csv*")))
    present = {p.name for p in (nih_root / "images").glob("*.png")}
    pa = table[(table["View Position"] == "PA") & table["Image Index"].isin(present)]
    boxes = pd.read_csv(nih_root / "BBox_List_2017.csv")
    return {"present": present, "pa": pa,
            "normal": set(pa.loc[pa["Finding Labels"] == "No Finding", "Image Index"]),
            "abnormal": set(pa.loc[pa["Finding Labels"] != "No Finding", "Image Index"]),
            "boxed": set(boxes["Image Index"]) & set(pa["Image Index"]),
            "table": table, "boxes": boxes}


def _names(samples):
    return {s.path.name for s in samples}


@pytest.mark.slow
def test_nih_counts_against_pandas(nih_root, nih_truth, caplog):
    assert len(nih_truth["present"]) == 92
    assert len(set(nih_truth["boxes"]["Image Index"]) & nih_truth["present"]) == 12
    assert (len(nih_truth["pa"]), len(nih_truth["normal"]), len(nih_truth["abnormal"]), len(nih_truth["boxed"])) == \
        (90, 56, 34, 10)
    with caplog.at_level(logging.WARNING, logger="apmask"):
        ds = build_dataset("nih", nih_root, "all")
    assert re.search(r"67220 of 67310 listed PA images are absent", caplog.text)
    assert ds.name == "nih/all"
    assert all(s.label == 0 and s.defect == "good" for s in ds.train)
    test_normal = [s for s in ds.test if s.label == 0]
    test_abn = [s for s in ds.test if s.label == 1]
    assert _names(ds.train) | _names(test_normal) == nih_truth["normal"]
    assert not _names(ds.train) & _names(test_normal)
    assert _names(test_abn) == nih_truth["abnormal"]
    assert len(ds.train) + len(ds.test) == 90
    assert _names(s for s in test_abn if s.has_pixel_gt) == nih_truth["boxed"]
    assert all(s.boxes == () and s.mask_path is None for s in test_abn if not s.has_pixel_gt)
    assert all(s.has_pixel_gt and not s.boxes for s in test_normal)
    assert len(ds.test_pixel_gt) == len(test_normal) + 10


@pytest.mark.slow
def test_nih_split_follows_documented_rule(nih_root, nih_truth):
    """Re-derive the patient split from the full table with pandas + hashlib."""
    t = nih_truth["table"]
    pa = t[t["View Position"] == "PA"]
    abn_patients = set(pa.loc[pa["Finding Labels"] != "No Finding", "Patient ID"])

    def coin(pid):
        return int.from_bytes(hashlib.sha256(f"0:{pid}".encode()).digest()[:8], "big") / 2 ** 64 < 0.2

    sub = nih_truth["pa"]
    exp_train = {r["Image Index"] for _, r in sub.iterrows()
                 if r["Finding Labels"] == "No Finding" and r["Patient ID"] not in abn_patients and not coin(r["Patient ID"])}
    ds = load_nih(nih_root, "all")
    assert _names(ds.train) == exp_train
    assert all(patient_in_test(p, 0.2) == coin(p) for p in range(1, 200))
    # patient-disjoint, deterministic, and test_fraction moves only normal-only patients
    pid = lambda ss: {s.get("patient_id") for s in ss}  # noqa: E731
    assert not pid(ds.train) & pid(ds.test)
    again = load_nih(nih_root, "all")
    assert [s.path for s in again.train] == [s.path for s in ds.train]
    assert [s.path for s in again.test] == [s.path for s in ds.test]
    none = load_nih(nih_root, "all", test_fraction=0.0)
    assert _names(none.train) >= _names(ds.train)
    assert {s.get("patient_id") for s in none.test if s.label == 0} <= {str(p) for p in abn_patients}
    boxed = load_nih(nih_root, "all", abnormal="boxed")
    assert _names(s for s in boxed.test if s.label) == nih_truth["boxed"]


@pytest.mark.slow
def test_nih_gender_subsets_partition_all(nih_root, nih_truth):
    all_ = load_nih(nih_root, "all")
    male, female = load_nih(nih_root, "male"), load_nih(nih_root, "female")
    for split in ("train", "test"):
        m, f, a = (_names(getattr(d, split)) for d in (male, female, all_))
        assert not m & f and m | f == a
    g = dict(zip(nih_truth["pa"]["Image Index"], nih_truth["pa"]["Patient Gender"]))
    assert all(g[s.path.name] == "M" for s in male.train + male.test)
    assert all(g[s.path.name] == "F" for s in female.train + female.test)
    assert all(s.get("gender") == "F" for s in female.test)
    with pytest.raises(ValueError, match="all, male, female"):
        load_nih(nih_root, "child")


@pytest.mark.slow
def test_nih_boxes_and_rgba_images(nih_root, nih_truth):
    ds = load_nih(nih_root, "all")
    b = nih_truth["boxes"]
    for s in ds.test_pixel_gt:
        if not s.boxes:
            continue
        rows = b[b["Image Index"] == s.path.name]
        assert len(s.boxes) == len(rows)
        x, y, w, h = rows.iloc[0][["Bbox [x", "y", "w", "h]"]].astype(float)
        assert s.boxes[0] == pytest.approx((x, y, w, h))
        img = ds.image(s)
        assert img.shape == (1024, 1024, 3)
        m = ds.mask(s, img.shape[:2])
        if len(rows) == 1:
            assert abs(int(m.sum()) - w * h) < 2 * (w + h) + 4
    rgba = nih_root / "images" / "00001369_000.png"  # one of the release's RGBA files
    assert cv2.imread(str(rgba), cv2.IMREAD_UNCHANGED).shape == (1024, 1024, 4)
    assert read_image(rgba).shape == (1024, 1024, 3)


def test_nih_box_list_with_trailing_unnamed_columns(tmp_path):
    csv = tmp_path / "BBox_List_2017.csv"
    csv.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                   "a.png,Mass,10.5,20,30,40,,,\n"
                   "a.png,Nodule,1,2,3,4,,,\n"
                   "b.png,Effusion,5,6,7,8,,,\n")
    boxes = read_boxes(csv)
    assert boxes["a.png"] == [("Mass", (10.5, 20.0, 30.0, 40.0)), ("Nodule", (1.0, 2.0, 3.0, 4.0))]
    assert boxes["b.png"] == [("Effusion", (5.0, 6.0, 7.0, 8.0))]
    (tmp_path / "bad.csv").write_text("Image Index,x,y\na.png,1,2\n")
    with pytest.raises(ValueError, match="bad.csv"):
        read_boxes(tmp_path / "bad.csv")


def test_nih_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_nih(tmp_path / "none", "all")
    with pytest.raises(FileNotFoundError, match="Data_Entry_2017"):
        load_nih(tmp_path, "all")


# ----------------------------------------------------------------------------- demo


@pytest.fixture(scope="module")
def demo_default(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    cats = demo.generate_demo(root)
    return root, cats, time.perf_counter() - t0


@pytest.mark.slow
def test_demo_default_generation(demo_default):
    root, cats, seconds = demo_default
    assert seconds < 30, f"default demo generation took {seconds:.1f}s"
    assert cats == ["brick", "grass", "gravel"]
    for cat in cats:
        ds = load_mvtec(root, cat, verify=True)
        assert len(ds.train) == 40
        assert sum(s.label == 0 for s in ds.test) == 10
        bad = [s for s in ds.test if s.label]
        assert len(bad) == 20 and {s.defect for s in bad} == set(demo.DEFECT_TYPES)
        img = ds.image(bad[0])
        assert img.shape == (256, 256, 3)
        assert not (img[:, :, 0] == img[:, :, 1]).all()  # tinted: really RGB
        for s in bad:
            area = ds.mask(s, (256, 256)).mean()
            assert 0.002 <= area < 0.25, (s.path, area)


@pytest.mark.parametrize("kind", demo.DEFECT_TYPES)
def test_demo_masks_are_exact(kind):
    """The change between the defect image and the same normal image lies on the mask."""
    size = 128
    for i in range(4):
        base = demo.normal_image("grass", size, demo._rng(5, "grass", "t", kind, i))
        img, mask = demo.defect_image("grass", kind, size, demo._rng(5, "grass", "t", kind, i))
        diff = np.abs(img - base).max(axis=2)
        assert mask.any()
        k = 9 if kind == "stain" else 3  # the stain's soft edge (opacity < 1/2) reaches further
        near = cv2.dilate(mask.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
        assert diff[~near].max() < 3.0, "pixels changed away from the mask"  # (anti-aliasing tails < 1.5 %)
        ring = near & ~mask
        assert diff[mask].mean() > 10.0
        if ring.any():
            assert diff[mask].mean() > diff[ring].mean()
        # at least most masked pixels really changed
        assert (diff[mask] > 1.0).mean() > 0.7


def test_demo_is_deterministic_and_idempotent(tmp_path):
    kw = dict(categories=["brick", "gravel"], image_size=48, n_train=3, n_test_good=2, n_test_defect_per_type=2)
    demo.generate_demo(tmp_path / "a", seed=3, **kw)
    demo.generate_demo(tmp_path / "b", seed=3, **kw)
    demo.generate_demo(tmp_path / "c", seed=4, **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 * (3 + 2 + 4 * 2 * 2 + 1)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    pngs = [f for f in files if f.suffix == ".png" and "ground_truth" not in f.parts]
    assert sum((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in pngs) == len(pngs)
    # same category alone: byte-identical too (per-image seeds)
    demo.generate_demo(tmp_path / "d", seed=3, **{**kw, "categories": ["gravel"]})
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "d" / f).read_bytes()
               for f in files if f.parts[0] == "gravel")
    # idempotent: same parameters leave files alone; other parameters regenerate
    probe = tmp_path / "a" / "brick" / "train" / "good" / "000.png"
    before = probe.stat().st_mtime_ns
    time.sleep(0.01)
    demo.generate_demo(tmp_path / "a", seed=3, **kw)
    assert probe.stat().st_mtime_ns == before
    demo.generate_demo(tmp_path / "a", seed=3, **{**kw, "n_train": 4})
    assert len(list((tmp_path / "a" / "brick" / "train" / "good").glob("*.png"))) == 4
    assert not list((tmp_path / "a").glob(".*partial*"))


def test_demo_refuses_foreign_folders_and_bad_args(tmp_path):
    (tmp_path / "brick").mkdir()
    (tmp_path / "brick" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not written by generate_demo"):
        demo.generate_demo(tmp_path, ["brick"], image_size=32, n_train=1, n_test_good=1, n_test_defect_per_type=1)
    assert (tmp_path / "brick" / "mine.txt").exists()
    with pytest.raises(ValueError, match="unknown demo categories"):
        demo.generate_demo(tmp_path, ["marble"])
    with pytest.raises(ValueError, match="unknown defect types"):
        demo.generate_demo(tmp_path, ["grass"], defect_types=["crack"])


@pytest.mark.slow
def test_build_dataset_demo_generates_on_demand(tmp_path, caplog):
    root = tmp_path / "data" / "demo"
    with caplog.at_level(logging.INFO, logger="apmask"):
        ds = build_dataset("demo", root, "gravel")
    assert "generating demo category gravel" in caplog.text
    assert ds.name == "demo/gravel" and len(ds.train) == 40 and len(ds.test) == 30
    assert not (root / "brick").exists()  # only the requested category
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="apmask"):
        build_dataset("demo", root, "gravel")
    assert "generating" not in caplog.text
    with pytest.raises(ValueError, match="unknown demo category"):
        build_dataset("demo", root, "bottle")


# ----------------------------------------------------------------------------- downloads


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        srv = self.server
        data = srv.files.get(self.path)
        rng = self.headers.get("Range")
        srv.seen.append((self.path, rng))
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and srv.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.cut_after is not None:  # simulate a dropped connection
            self.wfile.write(body[:srv.cut_after])
            srv.cut_after = None
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.seen, srv.honour_range, srv.cut_after = {}, [], True, None
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_download_offline_fails_fast_naming_data_root(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(download.DownloadError, match=r"data\.root"):
        download.download_file("http://127.0.0.1:9/mvtec.tar.xz", tmp_path / "m.tar.xz", timeout=3, progress=False)
    assert time.perf_counter() - t0 < 5
    assert not (tmp_path / "m.tar.xz").exists()


@pytest.mark.slow
def test_download_checksum_and_resume(tmp_path, http_server):
    srv, base = http_server
    payload = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
    sha, md5 = hashlib.sha256(payload).hexdigest(), hashlib.md5(payload).hexdigest()
    srv.files["/f.bin"] = payload
    # plain download, both digests checked
    out = download.download_file(f"{base}/f.bin", tmp_path / "a.bin", sha256=sha, md5=md5, progress=False)
    assert out.read_bytes() == payload and srv.seen[-1] == ("/f.bin", None)
    # wrong checksum: error naming the file, nothing left behind
    with pytest.raises(download.DownloadError, match="sha256 mismatch.*b.bin"):
        download.download_file(f"{base}/f.bin", tmp_path / "b.bin", sha256="0" * 64, progress=False)
    assert not (tmp_path / "b.bin").exists() and not (tmp_path / "b.bin.part").exists()
    # resume from an existing .part with a Range request
    (tmp_path / "c.bin.part").write_bytes(payload[:123_456])
    download.download_file(f"{base}/f.bin", tmp_path / "c.bin", sha256=sha, progress=False)
    assert srv.seen[-1] == ("/f.bin", "bytes=123456-")
    assert (tmp_path / "c.bin").read_bytes() == payload and not (tmp_path / "c.bin.part").exists()
    # a server that ignores Range: restart from zero, still correct
    srv.honour_range = False
    (tmp_path / "d.bin.part").write_bytes(b"stale bytes")
    download.download_file(f"{base}/f.bin", tmp_path / "d.bin", sha256=sha, progress=False)
    assert (tmp_path / "d.bin").read_bytes() == payload
    srv.honour_range = True
    # a complete .part (server answers 416) is just verified
    (tmp_path / "e.bin.part").write_bytes(payload)
    download.download_file(f"{base}/f.bin", tmp_path / "e.bin", md5=md5, progress=False)
    assert (tmp_path / "e.bin").read_bytes() == payload
    # a dropped connection keeps the .part; the next call resumes it
    srv.cut_after = 100_000
    with pytest.raises(download.DownloadError, match="resume"):
        download.download_file(f"{base}/f.bin", tmp_path / "g.bin", sha256=sha, progress=False, chunk=4096)
    assert (tmp_path / "g.bin.part").stat().st_size == 100_000
    download.download_file(f"{base}/f.bin", tmp_path / "g.bin", sha256=sha, progress=False)
    assert srv.seen[-1] == ("/f.bin", "bytes=100000-") and (tmp_path / "g.bin").read_bytes() == payload
    with pytest.raises(download.DownloadError, match="HTTP 404"):
        download.download_file(f"{base}/missing", tmp_path / "h.bin", progress=False)


@pytest.mark.slow
def test_download_mvtec_category_end_to_end(tmp_path, http_server, monkeypatch):
    srv, base = http_server
    src = _tiny_mvtec(tmp_path / "src", "bottle")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        tar.add(src / "bottle", arcname="bottle")
    srv.files["/bottle.tar.xz"] = buf.getvalue()
    monkeypatch.setitem(download.MVTEC_CATEGORY_URLS, "bottle", f"{base}/bottle.tar.xz")
    root = download.download_mvtec(tmp_path / "mvtec", ["bottle"], sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
                                   progress=False)
    ds = build_dataset("mvtec", root, "bottle")
    assert (len(ds.train), len(ds.test)) == (2, 3)
    assert not (root / "bottle.tar.xz").exists()
    n = len(srv.seen)
    download.download_mvtec(root, ["bottle"], progress=False)  # already there: no request
    assert len(srv.seen) == n
    with pytest.raises(ValueError, match="unknown MVTec AD categories"):
        download.download_mvtec(root, ["bottel"])


def test_download_urls_are_the_official_ones():
    assert download.MVTEC_URL.endswith("/420938113-1629952094/mvtec_anomaly_detection.tar.xz")
    assert set(download.MVTEC_CATEGORY_URLS) == set(__import__("apmask_lib.data", fromlist=["CATEGORIES"]).CATEGORIES)
    assert all(u.startswith("https://www.mydrive.ch/shares/") and u.endswith(f"/{c}.tar.xz")
               for c, u in download.MVTEC_CATEGORY_URLS.items())
    assert re.fullmatch(r"[0-9a-f]{64}", download.MVTEC_SHA256)
