"""NIH ChestX-ray14 (Wang et al., "ChestX-ray8", CVPR 2017) from its original release layout::

    ROOT/images/*.png                     1024x1024 PNGs (also ROOT/images_001/images/*.png, ... as unpacked
                                          from the per-part archives); a few are RGBA, some 16-bit
    ROOT/Data_Entry_2017*.csv[.gz]        label table (Image Index, Finding Labels, Patient ID,
                                          Patient Gender, View Position, ...); the newest one is used
    ROOT/BBox_List_2017.csv               boxes: Image Index, Finding Label, "Bbox [x", y, w, "h]"
                                          (+ empty trailing "Unnamed" columns in the release)

How the anomaly-detection split is built (deterministic, patient-disjoint):

* Only posterior-anterior views (``View Position == "PA"``) are used; AP images (boxed or not) are
  left out. Gender subsets (``category`` male | female) filter by ``Patient Gender`` *after* the split
  is decided, so male + female = all, sample for sample.
* "Normal" = ``Finding Labels == "No Finding"``; "abnormal" = any other finding.
* Patients are assigned to train or test from the full label table (not from which files happen to
  be present, so a partial download keeps everyone's side): every patient with at least one abnormal
  PA image is a test patient; a patient with only normal PA images is a test patient when
  ``sha256(f"{seed}:{patient_id}")`` maps below ``test_fraction``. No patient is in both splits.
* Train = the normal PA images of train patients (label 0).
* Test = all PA images of test patients: normals (label 0, defect "good") and, with
  ``abnormal="all"`` (default), every abnormal one (label 1, defect "abnormal"); ``abnormal="boxed"``
  keeps only abnormal images with a box (a localisation-only test set).
* Pixel ground truth: an abnormal image with boxes gets ``Sample.boxes`` (x, y, w, h) in original
  pixel coordinates (drawn by :meth:`AnomalyDataset.mask`); all boxes of the image are kept, though a
  box marks only the boxed finding. Abnormal images without a box have ``has_pixel_gt=False`` and must
  be left out of pixel-level metrics; normal test images have an all-false mask.
* Listed images whose file is absent are skipped and counted in one log line (logger "apmask").

``meta`` holds patient_id, gender, age, findings and (when boxed) box_findings.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pandas as pd

from .types import AnomalyDataset, Sample

log = logging.getLogger("apmask")

NIH_CATEGORIES = ("all", "male", "female")
NORMAL_LABEL = "No Finding"
_GENDER = {"male": "M", "female": "F"}
_ENTRY_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Gender", "View Position")


def patient_in_test(patient_id: int | str, test_fraction: float, seed: int = 0) -> bool:
    """Deterministic coin for a normal-only patient: sha256("seed:patient_id") as a number in [0, 1)
    below ``test_fraction``. Independent of row order, platform and Python's hash seed."""
    digest = hashlib.sha256(f"{seed}:{int(patient_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < test_fraction


def find_label_table(root: Path) -> Path:
    """The ``Data_Entry_2017*.csv[.gz]`` in ``root`` (the last in name order: v2020 over the 2017 file)."""
    found = sorted(p for p in root.glob("Data_Entry_2017*.csv*") if p.suffix in (".csv", ".gz"))
    if not found:
        raise FileNotFoundError(f"no Data_Entry_2017*.csv[.gz] label table in {root}; data.root must be the "
                                "NIH ChestX-ray14 folder holding images/, Data_Entry_2017*.csv and BBox_List_2017.csv")
    return found[-1]


def read_csv_named(path: Path) -> pd.DataFrame:
    """``pd.read_csv`` whose errors name the file (and the line, where pandas reports one): a
    malformed row, a truncated or corrupt ``.gz``, an empty or undecodable file."""
    import gzip
    import re
    import zlib

    try:
        return pd.read_csv(path)
    except pd.errors.ParserError as e:
        m = re.search(r"line (\d+)", str(e))
        where = f", line {m.group(1)}" if m else ""
        raise ValueError(f"malformed CSV {path}{where}: {e}; re-download the file") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise ValueError(f"cannot read {path} (truncated or corrupt{' gzip' if path.suffix == '.gz' else ''} file: "
                         f"{e}); re-download it") from None
    except (pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} as CSV ({type(e).__name__}: {e})") from None


def read_label_table(path: Path) -> pd.DataFrame:
    df = read_csv_named(path)
    missing = [c for c in _ENTRY_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"label table {path} lacks columns {missing}; found {list(df.columns)}")
    return df


def read_boxes(path: Path) -> dict[str, list[tuple[str, tuple[float, float, float, float]]]]:
    """``BBox_List_2017.csv`` -> {image name: [(finding, (x, y, w, h)), ...]} in original pixels.

    The release names the box columns "Bbox [x", "y", "w", "h]" and adds empty unnamed columns;
    both are handled (columns found by position after "Bbox [x")."""
    df = read_csv_named(path)
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed")]]
    cols = list(df.columns)
    start = next((i for i, c in enumerate(cols) if str(c).replace(" ", "").lower().startswith("bbox[x")), None)
    if "Image Index" not in cols or start is None or len(cols) < start + 4:
        raise ValueError(f"box list {path} does not have the expected columns "
                         f"'Image Index', 'Finding Label', 'Bbox [x', 'y', 'w', 'h]'; found {cols}")
    xywh = df.iloc[:, start:start + 4].astype(float).to_numpy()
    label_col = "Finding Label" if "Finding Label" in cols else None
    out: dict[str, list[tuple[str, tuple[float, float, float, float]]]] = {}
    for i, name in enumerate(df["Image Index"].astype(str)):
        finding = str(df[label_col].iloc[i]) if label_col else ""
        out.setdefault(name, []).append((finding, tuple(float(v) for v in xywh[i])))
    return out


def _image_paths(root: Path) -> dict[str, Path]:
    folders = [root / "images"] + sorted(root.glob("images_*/images"))
    paths: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for p in folder.iterdir():
                if p.suffix.lower() == ".png":
                    paths.setdefault(p.name, p)
    if not paths:
        raise FileNotFoundError(f"no PNG images in {root / 'images'} (or {root}/images_*/images); "
                                "data.root must be the NIH ChestX-ray14 folder")
    return paths


def load_nih(root: str | Path, category: str = "all", test_fraction: float = 0.2, seed: int = 0,
             abnormal: str = "all") -> AnomalyDataset:
    """Index NIH ChestX-ray14 as an anomaly-detection data set (see the module docstring for the split).

    ``category``: all | male | female. ``test_fraction``: share of normal-only patients put in test.
    ``seed``: the patient-hash seed. ``abnormal``: "all" abnormal PA images in test, or only "boxed" ones.
    """
    root = Path(root)
    if category not in NIH_CATEGORIES:
        raise ValueError(f"unknown NIH category {category!r}; choose from {', '.join(NIH_CATEGORIES)}")
    if abnormal not in ("all", "boxed"):
        raise ValueError(f"abnormal must be 'all' or 'boxed', got {abnormal!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"NIH data root {root} does not exist; set data.root to the ChestX-ray14 folder")
    table_path = find_label_table(root)
    df = read_label_table(table_path)
    box_path = root / "BBox_List_2017.csv"
    if box_path.is_file():
        boxes = read_boxes(box_path)
    else:
        log.warning("no %s: abnormal NIH test images will have no pixel ground truth", box_path)
        boxes = {}

    pa = df[df["View Position"].astype(str).str.strip() == "PA"].copy()
    pa["normal"] = pa["Finding Labels"].astype(str).str.strip() == NORMAL_LABEL
    abnormal_patients = set(pa.loc[~pa["normal"], "Patient ID"].astype(int))
    test_patients = abnormal_patients | {
        pid for pid in set(pa.loc[pa["normal"], "Patient ID"].astype(int)) - abnormal_patients
        if patient_in_test(pid, test_fraction, seed)}

    if category != "all":
        pa = pa[pa["Patient Gender"].astype(str).str.strip() == _GENDER[category]]
    paths = _image_paths(root)
    present = pa["Image Index"].isin(paths.keys())
    n_missing = int((~present).sum())
    if n_missing:
        log.warning("NIH %s: %d of %d listed PA images are absent from %s and were skipped",
                    category, n_missing, len(pa), root / "images")
    pa = pa[present].sort_values("Image Index")

    train: list[Sample] = []
    test: list[Sample] = []
    for rec in pa.to_dict("records"):
        name, pid = str(rec["Image Index"]), int(rec["Patient ID"])
        meta = [("patient_id", str(pid)), ("gender", str(rec["Patient Gender"])),
                ("age", str(rec.get("Patient Age", ""))), ("findings", str(rec["Finding Labels"]))]
        if pid not in test_patients:
            if rec["normal"]:  # always true: train patients have only normal PA images
                train.append(Sample(paths[name], 0, "good", meta=tuple(meta)))
            continue
        if rec["normal"]:
            test.append(Sample(paths[name], 0, "good", meta=tuple(meta)))
            continue
        img_boxes = boxes.get(name, [])
        if abnormal == "boxed" and not img_boxes:
            continue
        if img_boxes:
            meta.append(("box_findings", "|".join(f for f, _ in img_boxes)))
        test.append(Sample(paths[name], 1, "abnormal", boxes=tuple(b for _, b in img_boxes), meta=tuple(meta),
                           has_pixel_gt=bool(img_boxes)))
    if not train:
        raise FileNotFoundError(f"no normal training images found for NIH {category} in {root} "
                                f"(PA views, '{NORMAL_LABEL}', train patients)")
    ds = AnomalyDataset(name=f"nih/{category}", train=train, test=test)
    log.info("%s", ds.summary())
    return ds
