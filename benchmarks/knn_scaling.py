"""The kNN model at data-set sizes users have: time, memory and model file against the number of
training images, through the commands a user runs (a benchmark, not a test).

A folder data set is built from the real MVTec AD bottle images in ``runs/knn_scaling/data/``
(git-ignored): normal images = the 209 training images, then their horizontal flips, vertical flips and
180-degree rotations (836 in all; the first N are used); test images = the 83 test images in 7
orientations (the identity, both flips, the three right-angle rotations, the transpose: 581 images, 441
defective with pixel masks, transformed alike), the same test set for every N. The layout is that of
``params-folder.yaml`` (10 % of the normal images held out to choose the threshold, so the bank holds
0.9 N images). For each N one fresh process runs ``apmask fit --method knn`` and another ``apmask
evaluate --method knn`` (the own-data profile ``params-folder.yaml``, evaluate.* of this project's
defaults plus ``--set`` overrides); recorded: wall time, peak resident memory of the process
(``ru_maxrss``), model file size, and the evaluation's image AUROC / pixel AUROC / AU-PRO.

Rows go to ``results/knn_scaling.json`` as they finish (a row already there with the same settings is
skipped: the run resumes); ``--report`` renders ``results/knn_scaling.md`` and the figure
``results/figures/knn_scaling.png`` (dashed: the 10-minute and 200 MB targets)::

    .venv/bin/python -m benchmarks.knn_scaling --train 50 100 200 400 760
    .venv/bin/python -m benchmarks.knn_scaling --report
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.common import ROOT, command, data_root, machine, versions

from apmask_lib.core.files import atomic_write_text
from apmask_lib.data import read_image

JSON = ROOT / "results" / "knn_scaling.json"
MD = ROOT / "results" / "knn_scaling.md"
PNG = ROOT / "results" / "figures" / "knn_scaling.png"
RUNS = ROOT / "runs" / "knn_scaling"
DATA = RUNS / "data"
TRAIN_VIEWS = {"": lambda a: a, "_hflip": lambda a: a[:, ::-1], "_vflip": lambda a: a[::-1], "_rot180": lambda a: a[::-1, ::-1]}
TEST_VIEWS = {**TRAIN_VIEWS, "_rot90": lambda a: np.rot90(a, 1), "_rot270": lambda a: np.rot90(a, 3),
              "_transpose": lambda a: np.swapaxes(a, 0, 1)}


def write_png(path: Path, arr: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.ascontiguousarray(arr)
    if not cv2.imwrite(str(path), a[..., ::-1] if a.ndim == 3 else a):
        raise OSError(f"could not write {path}")


def build_data() -> dict:
    """Write the folder data set (module docstring) once; returns its counts."""
    import cv2

    done = DATA / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    src = Path(data_root("mvtec")) / "bottle"
    if not src.is_dir():
        raise SystemExit(f"MVTec AD bottle not found at {src} (benchmarks/common.py DATA_ROOTS)")
    shutil.rmtree(DATA, ignore_errors=True)
    train = sorted((src / "train" / "good").glob("*.png"))
    for suffix, f in TRAIN_VIEWS.items():
        for p in train:
            write_png(DATA / "good" / f"{p.stem}{suffix}.png", f(read_image(p)))
    n_test = n_masks = 0
    for d in sorted(x.name for x in (src / "test").iterdir() if x.is_dir()):
        for p in sorted((src / "test" / d).glob("*.png")):
            im = read_image(p)
            mask = None if d == "good" else cv2.imread(str(src / "ground_truth" / d / f"{p.stem}_mask.png"),
                                                       cv2.IMREAD_GRAYSCALE)
            for suffix, f in TEST_VIEWS.items():
                folder = DATA / ("test_good" if d == "good" else f"defects/{d}")
                write_png(folder / f"{p.stem}{suffix}.png", f(im))
                n_test += 1
                if mask is not None:
                    write_png(DATA / "masks" / d / f"{p.stem}{suffix}_mask.png", f(mask))
                    n_masks += 1
    info = {"normal": len(train) * len(TRAIN_VIEWS), "test": n_test, "masks": n_masks,
            "defects": sorted(x.name for x in (DATA / "defects").iterdir())}
    atomic_write_text(done, json.dumps(info) + "\n")
    return info


def params_for(n: int, info: dict, overrides: list[str]) -> Path:
    """params-folder.yaml pointed at the data set, ``max_train`` so that the bank holds the first N
    normal images' 90 %, and this run's out_dir."""
    p = yaml.safe_load((ROOT / "params-folder.yaml").read_text())
    tag = "n%d" % n + ("_" + "_".join(o.replace("=", "-").replace(".", "-") for o in overrides) if overrides else "")
    out = RUNS / tag
    p["out_dir"] = str(out)
    p["device"] = "cpu"
    p["data"].update(root=str(DATA), category="bottle_views", normal_dir="good", normal_test_dir="test_good",
                     abnormal_dir=[f"defects/{d}" for d in info["defects"]], mask_dir="masks",
                     normal_val_split=0.1, max_train=None)
    out.mkdir(parents=True, exist_ok=True)
    # the first N normal images: a folder of links to them (the folder data set reads a whole folder)
    sub = out / "good"
    if not sub.is_dir():
        sub.mkdir()
        for q in sorted((DATA / "good").glob("*.png"), key=lambda q: (view_rank(q.stem), q.stem))[:n]:
            os.symlink(q, sub / q.name)
    p["data"]["root"] = str(out)
    for name in ("test_good", "defects", "masks"):
        if not (out / name).exists():
            os.symlink(DATA / name, out / name)
    path = out / "params.yaml"
    atomic_write_text(path, yaml.safe_dump(p, sort_keys=False))
    return path


def view_rank(stem: str) -> int:
    return next((i for i, s in enumerate(list(TRAIN_VIEWS)[1:], 1) if stem.endswith(s)), 0)


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` in a fresh process: wall seconds and peak resident memory (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return {"s": time.perf_counter() - t0, "peak_mb": usage.ru_maxrss / 1024}


def run_row(n: int, info: dict, overrides: list[str]) -> dict:
    params = params_for(n, info, overrides)
    sets = [a for o in overrides for a in ("-S", o)]
    out = Path(yaml.safe_load(params.read_text())["out_dir"])
    for sub in ("knn", "evaluate_knn"):
        shutil.rmtree(out / sub, ignore_errors=True)
    load = os.getloadavg()
    apmask = str(Path(sys.executable).parent / "apmask")
    fit = timed([apmask, "fit", "--method", "knn", "--params", str(params), *sets])
    ev = timed([apmask, "evaluate", "--method", "knn", "--params", str(params), *sets])
    m = json.loads((out / "evaluate_knn" / "metrics.json").read_text())
    model = out / "knn" / "model.pt"
    meta = torch.load(model, map_location="cpu", weights_only=True, mmap=True)["meta"]
    return {"normal": n, "bank_images": meta["bank_images"], "test": m["n_images"], "overrides": overrides, "fit": fit, "evaluate": ev,
            "model_mb": model.stat().st_size / 2**20, "bank_patches": m["knn_model"]["bank_patches"],
            "bank_dtype": m["knn_model"].get("bank_dtype", "fp32"),
            "image_auroc": 100 * m["image_auroc"], "pixel_auroc": 100 * m["pixel_auroc"], "au_pro": 100 * m["au_pro"],
            "load_before": load, "load_after": os.getloadavg(), "date": dt.datetime.now().isoformat(timespec="seconds")}


def render(res: dict) -> str:
    lines = ["# kNN model: time, memory and file size against the training-set size", "",
             f"Command(s): {'; '.join(f'`{c}`' for c in res['commands'])}", "",
             f"Machine: {res['machine']}; {res['versions']}.", "",
             "Data: a folder data set built from the real MVTec AD bottle images (normal images = the 209 training "
             "images and their flips / 180-degree rotations, the first N used; test = the 83 test images in 7 "
             f"orientations, {res['data']['test']} images, {res['data']['masks']} with pixel masks, the same for "
             "every N; `benchmarks/knn_scaling.py`). Settings: `params-folder.yaml` with `--method knn` (10 % of "
             "the normal images held out for the threshold), the project's kNN defaults plus the overrides shown. "
             "Each command ran in a fresh process; fit = `apmask fit --method knn`, evaluate = `apmask evaluate "
             "--method knn` (features, search, metrics, figures, outputs), wall time; peak = the process's peak "
             "resident memory. Image AUROC / pixel AUROC / AU-PRO, %. Figure: "
             "[figures/knn_scaling.png](figures/knn_scaling.png).", "",
             "| normal images | overrides | bank patches (per size) | fit | evaluate | total | peak fit / evaluate "
             "| model file | metrics | load before → after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(res["rows"], key=lambda r: (r["overrides"], r["normal"])):
        lines.append(f"| {r['normal']} (bank {r['bank_images']}) | {' '.join(r['overrides']) or 'defaults'} | "
                     f"{' / '.join(map(str, r['bank_patches']))} ({r['bank_dtype']}) | {r['fit']['s']:.0f} s | "
                     f"{r['evaluate']['s']:.0f} s | {(r['fit']['s'] + r['evaluate']['s']) / 60:.1f} min | "
                     f"{r['fit']['peak_mb']:.0f} / {r['evaluate']['peak_mb']:.0f} MB | {r['model_mb']:.0f} MB | "
                     f"{r['image_auroc']:.2f} / {r['pixel_auroc']:.2f} / {r['au_pro']:.2f} | "
                     f"{r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path = PNG) -> None:
    """Time (fit, evaluate, total) and model file size against the number of normal images, one line per
    setting (seaborn: long-form rows, one hue per phase)."""
    import pandas as pd
    import seaborn as sns

    from apmask_lib.viz.figure import pyplot, save_figure

    plt = pyplot()
    long = [{"normal images": r["normal"], "settings": " ".join(r["overrides"]) or "defaults", "phase": phase,
             "minutes": sec / 60} for r in res["rows"]
            for phase, sec in (("fit", r["fit"]["s"]), ("evaluate", r["evaluate"]["s"]),
                               ("fit + evaluate", r["fit"]["s"] + r["evaluate"]["s"]))]
    files = [{"normal images": r["normal"], "settings": " ".join(r["overrides"]) or "defaults", "MB": r["model_mb"]}
             for r in res["rows"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    sns.lineplot(pd.DataFrame(long), x="normal images", y="minutes", hue="phase", style="settings", marker="o", ax=a)
    a.axhline(10, color="grey", lw=0.8, ls="--")
    a.set_title(f"apmask fit / evaluate --method knn, {res['data']['test']} test images")
    sns.lineplot(pd.DataFrame(files), x="normal images", y="MB", style="settings", marker="o", ax=b, color="k")
    b.axhline(200, color="grey", lw=0.8, ls="--")
    b.set_title("model file")
    b.set_ylim(bottom=0)
    fig.suptitle(res["machine"], fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", nargs="+", type=int, default=[50, 100, 200, 400, 760], help="normal images N")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides for every run")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args(argv)
    res = json.loads(JSON.read_text()) if JSON.is_file() else {"rows": [], "commands": []}
    if not args.report:
        info = build_data()
        res["commands"] = list(dict.fromkeys(res["commands"] + [command("knn_scaling", argv)]))
        res.update(machine=machine("cpu"), versions=versions(), data=info)
        for n in args.train:
            if n > info["normal"]:
                raise SystemExit(f"--train {n}: only {info['normal']} normal images")
            if not args.redo and any(r["normal"] == n and r["overrides"] == args.overrides for r in res["rows"]):
                continue
            row = run_row(n, info, args.overrides)
            print(json.dumps(row), flush=True)
            res["rows"] = [r for r in res["rows"] if not (r["normal"] == n and r["overrides"] == args.overrides)] + [row]
            atomic_write_text(JSON, json.dumps(res, indent=1) + "\n")
    atomic_write_text(MD, render(res))
    plot(res)
    print(f"wrote {MD}, {PNG}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
