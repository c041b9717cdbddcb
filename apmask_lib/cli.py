"""Command line: ``apmask <command>``. Every command reads ``params.yaml`` (``--params``) and
accepts ``-S section.key=value`` overrides, e.g. ``apmask pretrain -S pretrain.epochs=2``.

One command per step (``apmask COMMAND --help`` shows an example for each):

  fit       pre-train + fine-tune (pre-training is skipped when finetune.init is a backbone source);
            --method knn: the kNN memory bank alone, no training (OUT_DIR/knn/model.pt)
  evaluate  metrics on the test split + the decision threshold (evaluate/threshold.json)
  predict   score / threshold / anomalous per image + heatmaps of your images
  export    ONNX or TorchScript file for deployment (multi-scale averaging inside)

Also: data, pretrain, finetune, tables, attention-figure, notebook, collect, drop-resume-state, demo.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Optional

from .config import Config, load_params


def _cfg(args) -> Config:
    """``--params FILE`` must exist when named (``--params ''``: no file, the built-in defaults); without
    it, ``params.yaml`` is read if present here."""
    if args.params == "":
        return load_params(None, args.set)
    if args.params is not None:
        if not Path(args.params).is_file():
            raise SystemExit(f"apmask {args.command}: error: params file not found: {args.params} "
                             f"(run where it is, or name another with --params)")
        return load_params(args.params, args.set)
    return load_params("params.yaml" if Path("params.yaml").is_file() else None, args.set)


def cmd_data(args) -> None:
    from .data import dataset_from_config

    cfg = _cfg(args)
    ds = dataset_from_config(cfg.data)
    print(f"{ds.name}: {len(ds.train)} train, {len(ds.test)} test "
          f"({sum(s.label for s in ds.test)} anomalous, {sum(s.label == 1 and s.has_pixel_gt for s in ds.test)} of "
          "them with pixel ground truth)"
          + (f", {len(ds.val)} validation" if ds.val else ""))
    if not args.no_verify:
        from .data.verify import verify_split

        checked, cached = verify_split(ds, progress=False)
        print(f"verified every image and mask: {checked} decoded now, {cached} unchanged since they last passed")
    if args.index:
        from .core.files import write_json

        def listing(samples):
            return [[str(s.path), s.label, s.defect, s.path.stat().st_size] for s in samples]

        write_json(args.index, {"name": ds.name, "dataset": cfg.data.dataset, "root": cfg.data.root,
                                "category": cfg.data.category, "n_train": len(ds.train), "n_test": len(ds.test),
                                "train": listing(ds.train), "test": listing(ds.test)})


def cmd_collect(args) -> None:
    from .report.collect import collect_run

    stages = tuple(args.stage) if args.stage else ("pretrain", "finetune", "evaluate")
    for k, v in collect_run(args.run, args.name, args.results, stages).items():
        print(f"{k}: {v}")


def cmd_drop_resume_state(args) -> None:
    """Delete ``checkpoint.pt`` (optimizer, student, teacher: the resume state, ~5x the weights) from
    finished stage folders, so DVC caches only the exported weights and logs. A folder whose run
    did not finish keeps it (it is what resumes), unless ``--all``, which also removes the folder's
    ``done.json``: the stage then starts afresh (DVC has already removed the declared outputs). A
    finished folder without its resume state is not re-trained by a later run outside DVC without
    ``--force`` (docs/reliability.md)."""
    from .training import runfolder
    from .core.files import load_checkpoint

    for folder in args.folders:
        if args.all:
            runfolder.clear_marker(folder)
        ckpt = Path(folder) / "checkpoint.pt"
        if not ckpt.is_file():
            continue
        if not args.all and not load_checkpoint(ckpt).get("done", False):
            print(f"{ckpt}: run not finished, kept (it resumes the run)")
            continue
        size = ckpt.stat().st_size
        ckpt.unlink()
        print(f"{ckpt}: removed ({size / 2**20:.0f} MiB resume state)")


def _attention_images(cfg: Config, n: int = 4):
    """Real bottle images when ../shared/data is beside the project, else the configured dataset."""
    from .data import build_dataset, dataset_from_config, read_image

    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"
    if (shared / "bottle").is_dir():
        ds = build_dataset("mvtec", shared, "bottle")
        first = {}
        for s in ds.test:
            first.setdefault(s.defect, s)  # one image per defect type
        picks = [s for d, s in sorted(first.items()) if d != "good"][:n - 1] + ds.train[:1]
        return [read_image(s.path) for s in picks], [f"bottle/{s.defect}" for s in picks]
    ds = dataset_from_config(cfg.data)
    picks = ([s for s in ds.test if s.label == 1] + ds.train)[:n]
    return [read_image(s.path) for s in picks], [f"{ds.name}/{s.defect}" for s in picks]


def cmd_attention_figure(args) -> None:
    from .weights import build_backbone
    from .viz.backbone import fig_backbone_attention

    cfg = _cfg(args)
    images, titles = _attention_images(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbones = {cfg.backbone: build_backbone(cfg.backbone), "random": build_backbone("random", seed=cfg.seed)}
    out = fig_backbone_attention(images, backbones, args.out, titles=titles)
    print(f"wrote {out}")


def cmd_pretrain(args) -> None:
    from .pretrain.stage import run_pretrain

    print(run_pretrain(_cfg(args), force=args.force))


def cmd_finetune(args) -> None:
    from .finetune.stage import run_finetune

    print(run_finetune(_cfg(args), force=args.force))


#: the smallest settings that are not the demo's micro schedule (params.yaml: 112 px, 15 epochs), which
#: suits the generated demo and is too small for real images
REAL_DATA_MIN = {"data.image_size": 224, "finetune.epochs": 20}


def micro_schedule_warning(cfg) -> Optional[str]:
    """A warning when the detector would be trained on data that is not the demo with settings below
    :data:`REAL_DATA_MIN` (e.g. inherited by editing params.yaml); None otherwise."""
    if cfg.data.dataset == "demo":
        return None
    values = {"data.image_size": cfg.data.image_size, "finetune.epochs": cfg.finetune.epochs}
    small = [f"{k}={v}" for k, v in values.items() if v < REAL_DATA_MIN[k]]
    if not small:
        return None
    return (f"training the detector on {cfg.data.dataset} data with {', '.join(small)}: the demo's micro schedule, "
            f"too small for real images; start from params-folder.yaml (apmask fit --params params-folder.yaml) "
            f"or set " + " and ".join(f"{k} >= {v}" for k, v in REAL_DATA_MIN.items()))


def cmd_fit(args) -> None:
    cfg = _cfg(args)
    if args.method != "knn" and (warning := micro_schedule_warning(cfg)):
        logging.getLogger("apmask").warning(warning)
    if args.method == "knn":
        from .knn.model import fit_knn_model

        print(f"kNN model (no training): {fit_knn_model(cfg, force=args.force)}")
        return
    from .finetune.stage import run_finetune
    from .pretrain.stage import run_pretrain

    if cfg.finetune.init == "pretrain":
        print(f"pre-training: {run_pretrain(cfg, force=args.force)}")
    else:
        print(f"pre-training skipped: finetune.init={cfg.finetune.init}")
    print(f"fine-tuning: {run_finetune(cfg, force=args.force)}")


def cmd_evaluate(args) -> None:
    from .evaluate.stage import run_evaluate

    cfg = _cfg(args)
    model = args.model
    if model is None and args.method == "knn":
        from .knn.model import knn_model_path

        model = knn_model_path(cfg)
    m = run_evaluate(cfg, model_path=model)
    keys = ("image_auroc", "pixel_auroc", "au_pro", "f1_max")
    print(" ".join(f"{k}={m[k]:.4f}" for k in keys if isinstance(m.get(k), (int, float))))
    print(f"pixel metrics: {m.get('pixel_metrics_scope')}")
    t = m.get("threshold") or {}
    if t:
        print(f"threshold {t['image_threshold']:.6g} on {t['image_score']} ({t['image_method']}; chosen on "
              f"{t['chosen_on']}); pixel threshold {t['pixel_threshold']:.6g} ({t['pixel_method']})")


def cmd_export(args) -> None:
    from .deploy.export import export_detector

    cfg = _cfg(args)
    scales = tuple(args.scales) if args.scales else cfg.evaluate.scales
    out = export_detector(args.model, args.out, args.format, scales=scales, threshold=args.threshold,
                          force=args.force)
    print(f"wrote {out} and {out.name}.json")


def cmd_predict(args) -> None:
    from .deploy.predict import predict

    cfg = _cfg(args)
    scales = tuple(args.scales) if args.scales else cfg.evaluate.scales
    threshold = args.threshold
    if threshold is not None:
        try:
            threshold = float(threshold)
        except ValueError:
            pass  # a threshold.json path
    from .deploy.predict import MAX_PIXELS, summary_line

    rows = predict(args.model, args.inputs, args.out, scales=scales, device=args.device or cfg.device,
                   batch_size=args.batch_size or cfg.evaluate.batch_size, threshold=threshold, force=args.force,
                   max_pixels=args.max_pixels or MAX_PIXELS)
    print(summary_line(args.out))
    bad = [r for r in rows if r.get("status") == "error"]
    if bad:
        sys.exit(1)


def cmd_tables(args) -> None:
    from .report.tables import write_tables

    write_tables(args.runs, args.out)
    print(f"tables written to {args.out}")


def cmd_notebook(args) -> None:
    import yaml

    from .notebook import execute

    params = {}
    for k, v in args.param:
        params[k] = yaml.safe_load(v)
    print(execute(args.name, params, out_dir=args.out, html=not args.no_html, name=args.save_as))


def pipeline_root(start: str | Path | None = None) -> Path:
    """The project folder the pipeline runs in: the nearest folder holding ``dvc.yaml`` at or
    above ``start`` (default: the current folder)."""
    here = Path(start or Path.cwd()).resolve()
    for cand in (here, *here.parents):
        if (cand / "dvc.yaml").is_file():
            return cand
    raise FileNotFoundError(f"no dvc.yaml in {here} or above: run `apmask demo` inside the apmask project "
                            "folder (the one holding dvc.yaml and params.yaml)")


def cmd_demo(args) -> None:
    """The README's main job: ``dvc repro`` in the project folder the user stands in (found from
    the current folder, not from where the package is installed), under the pinned numerical
    environment of :mod:`apmask_lib.core.repro` so the committed metrics are reproduced."""
    from .core.repro import pipeline_env

    root = pipeline_root()
    bin_dir = Path(sys.executable).parent
    env = pipeline_env(dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"))
    print(f"apmask demo: dvc repro in {root}", flush=True)
    if not (root / ".dvc").is_dir():
        subprocess.run([str(bin_dir / "dvc"), "init", "--no-scm" if not (root / ".git").exists() else "-q"],
                       cwd=root, check=True, env=env)
    subprocess.run([str(bin_dir / "dvc"), "repro"], cwd=root, check=True, env=env)


def main(argv: list[str] | None = None) -> None:
    from .core.repro import pin_process

    try:
        pin_process()  # before anything imports torch: fixed threads + AVX2 code paths (apmask_lib/core/repro.py)
    except ValueError as e:  # an unknown APMASK_NUMERICS: one line, no traceback
        raise SystemExit(f"apmask: {e}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="apmask", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add(name, fn, help_, example=None):
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=f"example:\n  {example}" if example else None)
        sp.add_argument("--params", default=None,
                        help="params file; must exist when given; '' = none, the built-in defaults "
                             "(default: ./params.yaml if present, else the built-in defaults)")
        sp.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. -S pretrain.epochs=2 (repeatable)")
        sp.set_defaults(fn=fn)
        return sp

    sp = add("data", cmd_data, "index (and for the demo, generate) the configured dataset")
    sp.add_argument("--index", default=None, help="also write a JSON listing of the files (a DVC dependency)")
    sp.add_argument("--no-verify", action="store_true",
                    help="only index; by default every image and mask is decoded once (cached by size/mtime)")
    sp = sub.add_parser("collect", help="copy a run's metrics/plots to results/ for DVC")
    sp.add_argument("--run", required=True, help="the run folder (OUT_DIR), e.g. runs/demo/brick/s0")
    sp.add_argument("--name", required=True, help="the run's name in results/ (e.g. brick_s0)")
    sp.add_argument("--results", default="results", help="the results folder to copy into (default results)")
    sp.add_argument("--stage", action="append", choices=("pretrain", "finetune", "evaluate"),
                    help="collect only this stage's part (repeatable; default: all)")
    sp.set_defaults(fn=cmd_collect)
    sp = add("attention-figure", cmd_attention_figure, "figure of the backbone's mean [CLS] attention")
    sp.add_argument("--out", default="runs/adhoc/figures/backbone_attention.png",
                    help="PNG to write (the DVC stage passes results/figures/backbone_attention.png)")
    folder_example = ("apmask fit -S data.dataset=folder -S data.root=my_data -S data.category=widget "
                      "-S data.normal_dir=good -S 'data.abnormal_dir=[scratch, dent]' -S data.mask_dir=masks "
                      "-S out_dir=runs/widget")
    for name, fn, help_, example in (
            ("pretrain", cmd_pretrain, "APMask pre-training", None),
            ("finetune", cmd_finetune, "fine-tuning on synthetic anomalies", None),
            ("fit", cmd_fit, "pre-train + fine-tune the detector (resumes; a finished stage is not redone), or with "
             "--method knn fit the training-free kNN memory bank alone (OUT_DIR/knn/model.pt)",
             folder_example + "\n  " + folder_example.replace("apmask fit", "apmask fit --method knn"))):
        sp = add(name, fn, help_, example)
        sp.add_argument("--force", action="store_true",
                        help="train from scratch over a run folder that holds finished outputs (otherwise refused)")
        if name == "fit":
            sp.add_argument("--method", choices=("detector", "knn"), default="detector",
                            help="detector: the paper's pre-training + fine-tuning (default); knn: the kNN extension "
                                 "alone, no training: banks of block evaluate.knn_layer (default 7) patch features of "
                                 "the training images at evaluate.knn_sizes (apmask_lib/knn/model.py)")
    sp = add("evaluate", cmd_evaluate, "multi-scale evaluation on the test split; writes metrics.json, scores.csv "
             "and the decision threshold OUT_DIR/evaluate/threshold.json",
             "apmask evaluate -S data.dataset=folder -S data.root=my_data -S data.category=widget "
             "-S data.normal_dir=good -S 'data.abnormal_dir=[scratch, dent]' -S out_dir=runs/widget")
    sp.add_argument("--model", default=None, help="detector checkpoint or kNN model (default: OUT_DIR/finetune/model.pt, "
                    "with --method knn OUT_DIR/knn/model.pt)")
    sp.add_argument("--method", choices=("detector", "knn"), default="detector",
                    help="which model of OUT_DIR to evaluate when --model is not given; a kNN model writes "
                         "OUT_DIR/evaluate_knn/")
    sp = add("predict", cmd_predict, "score your own images: predictions.csv (score, threshold, anomalous), "
             "heatmaps/ with the region above the pixel threshold outlined, predict.json",
             "apmask predict --model runs/widget/finetune/model.pt --out predictions/widget new_images/")
    sp.add_argument("--model", required=True, help="detector checkpoint or kNN model (model.pt)")
    sp.add_argument("--out", required=True, help="output folder; must be empty or absent unless --force")
    sp.add_argument("--threshold", default=None,
                    help="a number (on the model's image score) or a threshold.json (default: the one apmask "
                         "evaluate wrote for this model: MODEL_DIR/threshold.json, else MODEL_DIR/../evaluate/"
                         "threshold.json for a detector, MODEL_DIR/../evaluate_knn/threshold.json for a kNN model)")
    sp.add_argument("--force", action="store_true", help="replace earlier predictions in --out")
    sp.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (default 64 000 000)")
    sp.add_argument("--batch-size", type=int, default=None, help="images per batch (default evaluate.batch_size)")
    sp.add_argument("--scales", type=int, nargs="*", default=None,
                    help="test scales of a detector (default evaluate.scales; a kNN model uses its own sizes)")
    sp.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: the config's device, auto)")
    sp.add_argument("inputs", nargs="+", help="image files and/or folders")
    sp = add("export", cmd_export, "write the detector or a kNN model as ONNX or TorchScript (images (B,3,H,W) in [0,1] -> "
             "score (B,), map (B,H,W), probs (B,S)); docs/own-data.md runs it with onnxruntime",
             "apmask export --model runs/widget/finetune/model.pt --format onnx --out widget.onnx")
    sp.add_argument("--model", required=True, help="detector checkpoint or kNN model (model.pt)")
    sp.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="file format (default onnx)")
    sp.add_argument("--out", required=True, help="output file (a .json description is written beside it)")
    sp.add_argument("--threshold", default=None, help="threshold.json to embed (default: the one apmask evaluate wrote)")
    sp.add_argument("--scales", type=int, nargs="*", default=None, help="default: evaluate.scales")
    sp.add_argument("--force", action="store_true", help="replace an existing output file")
    sp = add("tables", cmd_tables, "Tables 1-4 from finished runs")
    sp.add_argument("--runs", default="runs", help="folder holding the finished runs (default runs)")
    sp.add_argument("--out", default="runs/adhoc/tables", help="output folder (the DVC stage writes results/tables)")
    sp = sub.add_parser("notebook", help="run a numbered notebook with papermill (+ HTML report)")
    sp.add_argument("name", help="e.g. 01_pretrain or notebooks/01_pretrain.ipynb")
    sp.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="papermill parameter (YAML value), repeatable")
    sp.add_argument("--out", default="runs/adhoc/notebooks",
                    help="folder of the executed copy + HTML (default runs/adhoc/notebooks; the DVC stages pass results/notebooks)")
    sp.add_argument("--no-html", action="store_true", help="skip the HTML report of the executed notebook")
    sp.add_argument("--save-as", default=None, help="file name (no suffix) of the executed copy")
    sp.set_defaults(fn=cmd_notebook, params=None, set=[])
    sp = sub.add_parser("drop-resume-state", help="delete checkpoint.pt of finished pretrain/finetune folders")
    sp.add_argument("folders", nargs="+", help="stage folders, e.g. runs/demo/brick/s0/pretrain")
    sp.add_argument("--all", action="store_true",
                    help="also unfinished runs' checkpoints (a DVC stage starts afresh: its code may have changed)")
    sp.set_defaults(fn=cmd_drop_resume_state)
    add("demo", cmd_demo, "run the whole pipeline on the built-in demo data (dvc repro)")
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, FloatingPointError) as e:
        if os.environ.get("APMASK_DEBUG"):
            raise
        print(f"apmask {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
