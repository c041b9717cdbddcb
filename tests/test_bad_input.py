"""Bad input and interrupted runs (issue 14): nothing lost, nothing silently wrong.

One section per guarantee listed in docs/reliability.md; every test here reproduced a failure
before its fix. The runs are tiny (ViT-tiny/16 at 64 px on a generated MVTec-layout folder), so the
file needs no real data and runs in well under a minute on two CPU cores.

Sections:
  1. impossible configurations are refused at load, naming the key (and YAML errors the file/line)
  2. an explicitly named params file that does not exist is an error
  3. a run folder holding finished outputs is never overwritten without --force
  4. "done" means every output is written and consistent (kill -9 during the last save)
  5. masks: coloured, 16-bit and alpha-only masks are read, not silently empty
  8. one run per folder: a lock with the PID; a stale lock is taken over
  weak list: data verification, skipped files, NIH tables, garbage checkpoints, the offline-backbone
  cache, architecture bounds, file modes, NaN losses
"""
from __future__ import annotations

import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from apmask_lib.cli import main
from apmask_lib.config import Config, load_params, replace

pytestmark = pytest.mark.filterwarnings("ignore:backbone .random")
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fixtures
def make_mvtec(root: Path, n_train: int = 8, size: int = 64, category: str = "bottle") -> Path:
    """A tiny MVTec-layout folder: ``n_train`` noise images, one good and one defective test image."""
    rng = np.random.default_rng(0)
    cat = root / category
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (cat / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(cat / "train/good" / f"{i:03d}.png"), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    cv2.imwrite(str(cat / "test/good/000.png"), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    cv2.imwrite(str(cat / "test/crack/000.png"), rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    m = np.zeros((size, size), np.uint8)
    m[10:20, 10:30] = 255
    cv2.imwrite(str(cat / "ground_truth/crack/000_mask.png"), m)
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_mvtec(tmp_path_factory.mktemp("data"))


PRETRAIN = {"global_size": 64, "local_size": 32, "n_local": 2, "hidden_dim": 64, "batch_size": 4, "epochs": 2,
            "warmup_epochs": 1, "log_every": 2, "num_workers": 0}
FINETUNE = {"init": "random:vit_tiny16", "batch_size": 4, "epochs": 2, "warmup_epochs": 1, "num_workers": 0,
            "log_every": 2}


def tiny_cfg(data_root: Path, out_dir: Path, **sections) -> Config:
    base = {"data": {"dataset": "mvtec", "root": str(data_root), "category": "bottle", "image_size": 64},
            "pretrain": dict(PRETRAIN), "finetune": dict(FINETUNE)}
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return replace(Config(), seed=0, backbone="random:vit_tiny16", device="cpu", out_dir=str(out_dir),
                   pretrain={"bottleneck_dim": 32, **base.pop("pretrain")}, **base)


def tiny_args(data_root: Path, out_dir: Path) -> list[str]:
    """The same tiny configuration as CLI overrides."""
    sets = [f"out_dir={out_dir}", "backbone=random:vit_tiny16", "device=cpu", "data.dataset=mvtec",
            f"data.root={data_root}", "data.category=bottle", "data.image_size=64", "pretrain.bottleneck_dim=32"]
    sets += [f"pretrain.{k}={v}" for k, v in PRETRAIN.items()] + [f"finetune.{k}={v}" for k, v in FINETUNE.items()]
    return [x for s in sets for x in ("-S", s)]


def run_pretrain(cfg, **kw):
    from apmask_lib.pretrain.stage import run_pretrain as rp

    return rp(cfg, progress=False, **kw)


def run_finetune(cfg, **kw):
    from apmask_lib.finetune.stage import run_finetune as rf

    return rf(cfg, progress=False, **kw)


def child(code: str, **popen) -> subprocess.Popen:
    """A Python child process with this worktree on its path."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


# ============================================================================ 1. impossible configurations
@pytest.mark.parametrize("override,key", [
    ("pretrain.batch_size=-4", "pretrain.batch_size"),
    ("pretrain.epochs=0", "pretrain.epochs"),
    ("pretrain.epochs=-1", "pretrain.epochs"),
    ("finetune.epochs=-3", "finetune.epochs"),
    ("finetune.batch_size=0", "finetune.batch_size"),
    ("data.image_size=0", "data.image_size"),
    ("data.max_train=0", "data.max_train"),
    ("pretrain.n_prototypes=0", "pretrain.n_prototypes"),
    ("pretrain.mask_ratio=1.5", "pretrain.mask_ratio"),
    ("pretrain.temperature=0", "pretrain.temperature"),
    ("pretrain.lr=nan", "pretrain.lr"),
    ("pretrain.log_every=0", "pretrain.log_every"),
    ("evaluate.scales=[]", "evaluate.scales"),
    ("evaluate.scales=[224, -1]", "evaluate.scales"),
    ("evaluate.batch_size=0", "evaluate.batch_size"),
    ("pretrain.global_scale=[0.9, 0.1]", "pretrain.global_scale"),
    ("pretrain.epochs=2.5", "pretrain.epochs"),
    ("finetune.batch_size=true", "finetune.batch_size"),
    ("pretrain.mask=apmsk", "pretrain.mask"),
])
def test_impossible_values_are_refused_at_load_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_params(None, [override])


def test_impossible_schedule_on_the_cli_exits_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "-S", "pretrain.batch_size=-4", "-S", f"out_dir={tmp_path / 'run'}"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "pretrain.batch_size" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  epochs: 3\n  lr: [1e-4,\n")
    with pytest.raises(ValueError) as e:
        load_params(p)
    msg = str(e.value)
    assert str(p) in msg and "line" in msg and "<unicode string>" not in msg


def test_valid_values_still_load():
    cfg = load_params(None, ["pretrain.epochs=1", "data.max_train=null", "evaluate.pixel_bins=null",
                             "evaluate.knn_layer=7", "pretrain.mask_ratio=0", "finetune.anomaly_fraction=1"])
    assert cfg.pretrain.epochs == 1 and cfg.evaluate.knn_layer == 7


# ============================================================================ 2. missing params file
def test_an_explicitly_named_params_file_must_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--params", "params.yaml", "-S", "data.dataset=mvtec",
              "-S", f"data.root={tmp_path / 'nothing'}", "-S", f"out_dir={tmp_path / 'run'}"])
    assert e.value.code not in (0, None)  # SystemExit(message): printed to stderr, exit status 1
    assert "params file not found: params.yaml" in f"{e.value.code} {capsys.readouterr().err}"
    assert not (tmp_path / "run").exists()


# ============================================================================ 3. finished outputs are never overwritten
@pytest.mark.slow
def test_deleting_the_checkpoint_does_not_retrain_over_finished_outputs(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path)
    out = run_pretrain(cfg)
    backbone = (out / "backbone.pt").read_bytes()
    log = (out / "log.csv").read_text()
    (out / "checkpoint.pt").unlink()
    with pytest.raises(FileExistsError, match="--force"):
        run_pretrain(cfg)
    assert (out / "backbone.pt").read_bytes() == backbone and (out / "log.csv").read_text() == log
    with pytest.raises(FileExistsError, match="--force"):  # resume=False is not a licence to overwrite either
        run_pretrain(cfg, resume=False)
    run_pretrain(cfg, force=True)  # the explicit way
    assert (out / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_finetune_keeps_a_finished_model_too(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path)
    out = run_finetune(cfg)
    model = (out / "model.pt").read_bytes()
    (out / "checkpoint.pt").unlink()
    with pytest.raises(FileExistsError, match="model.pt"):
        run_finetune(cfg)
    assert (out / "model.pt").read_bytes() == model


@pytest.mark.slow
def test_cli_force_flag(data_root, tmp_path, capsys):
    args = tiny_args(data_root, tmp_path)
    main(["pretrain", *args])
    (tmp_path / "pretrain" / "checkpoint.pt").unlink()
    with pytest.raises(SystemExit):
        main(["pretrain", *args])
    assert "--force" in capsys.readouterr().err
    main(["pretrain", "--force", *args])
    assert (tmp_path / "pretrain" / "checkpoint.pt").is_file()


@pytest.mark.slow
def test_a_dvc_rerun_starts_afresh_after_the_resume_state_was_dropped(data_root, tmp_path):
    """The DVC stage's sequence: run, drop the resume state (finished run: done.json stays, so a later
    run outside DVC is refused as above); on the next `dvc repro` DVC removes the declared outputs and
    the stage's `drop-resume-state --all` clears the marker, so the stage trains instead of refusing."""
    cfg = tiny_cfg(data_root, tmp_path)
    out = run_pretrain(cfg)
    main(["drop-resume-state", str(out)])
    assert not (out / "checkpoint.pt").exists() and (out / "done.json").is_file()
    with pytest.raises(FileExistsError, match="--force"):
        run_pretrain(cfg)
    (out / "backbone.pt").unlink()          # what dvc repro does to the stage's outs
    main(["drop-resume-state", "--all", str(out)])
    assert not (out / "done.json").exists()
    run_pretrain(cfg)
    assert (out / "backbone.pt").is_file() and (out / "done.json").is_file()


# ============================================================================ 4. kill -9 during the last save
@pytest.mark.slow
def test_kill_during_the_last_save_is_repaired_on_resume(data_root, tmp_path):
    """The child dies (SIGKILL) between writing the final checkpoint and exporting backbone.pt,
    leaving the previous epoch's backbone.pt and a temporary file behind."""
    p = child(f"""
        import os, signal, torch
        from tests.test_bad_input import tiny_cfg, run_pretrain
        from pathlib import Path
        real, n = os.replace, []
        def replace(src, dst):
            if str(dst).endswith("backbone.pt"):
                n.append(1)
                if len(n) == 2:  # the second (last) export: die with the temporary written
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)
        os.replace = replace
        run_pretrain(tiny_cfg(Path({str(data_root)!r}), Path({str(tmp_path)!r})))
    """)
    p.communicate(timeout=300)
    assert p.returncode == -9
    out = tmp_path / "pretrain"
    assert list(out.glob("*.tmp")) or list(out.glob(".*.tmp"))
    from apmask_lib.core.files import load_checkpoint

    ck = load_checkpoint(out / "checkpoint.pt")
    assert ck["done"]
    stale = torch.load(out / "backbone.pt", weights_only=True)
    teacher = {k[len("backbone."):]: v for k, v in ck["teacher"].items() if k.startswith("backbone.")}
    assert not all(torch.equal(stale[k], teacher[k]) for k in teacher)  # the stale export
    run_pretrain(tiny_cfg(data_root, tmp_path))
    fresh = torch.load(out / "backbone.pt", weights_only=True)
    assert all(torch.equal(fresh[k], teacher[k]) for k in teacher)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert (out / "done.json").is_file()


@pytest.mark.slow
def test_an_export_changed_after_the_run_is_rederived(data_root, tmp_path):
    cfg = tiny_cfg(data_root, tmp_path)
    out = run_finetune(cfg, max_steps=2)
    from apmask_lib.weights import read_detector_checkpoint

    good = read_detector_checkpoint(out / "model.pt")
    blob = (out / "model.pt").read_bytes()
    (out / "model.pt").write_bytes(blob[: len(blob) // 2])  # truncated by a crash or a full disk
    run_finetune(cfg, max_steps=2)
    again = read_detector_checkpoint(out / "model.pt")
    assert again["meta"] == good["meta"] and again["state_dict"].keys() == good["state_dict"].keys()
    assert all(torch.equal(again["state_dict"][k], v) for k, v in good["state_dict"].items())


# ============================================================================ 5. masks
def _mask_cases(fg: np.ndarray) -> dict[str, np.ndarray]:
    u8 = fg.astype(np.uint8)
    red = np.zeros(fg.shape + (3,), np.uint8)
    red[..., 2] = 255 * u8  # BGR on disk: red foreground
    alpha = np.zeros(fg.shape + (4,), np.uint8)
    alpha[..., 3] = 255 * u8  # transparent background, opaque black foreground
    opaque_white = np.full(fg.shape + (4,), 255, np.uint8)
    opaque_white[..., :3] = 255 * u8[..., None]  # fully opaque, white foreground
    return {"gray_0_255": 255 * u8, "gray_0_1": u8, "rgb_red": red, "u16_0_255": (255 * u8).astype(np.uint16),
            "u16_0_1": u8.astype(np.uint16), "u16_0_65535": 65535 * u8.astype(np.uint16), "alpha_only": alpha,
            "rgba_opaque_white": opaque_white, "gray_alpha_only": np.stack([np.zeros_like(u8), 255 * u8], -1)}


@pytest.mark.parametrize("kind", list(_mask_cases(np.zeros((2, 2), bool))))
def test_masks_of_every_kind_are_read(tmp_path, kind):
    from apmask_lib.data import read_mask

    fg = np.zeros((16, 20), bool)
    fg[4:9, 3:11] = True
    arr = _mask_cases(fg)[kind]
    path = tmp_path / f"{kind}.png"
    if kind == "gray_alpha_only":  # OpenCV cannot write gray+alpha: build it with Pillow
        from PIL import Image

        Image.fromarray(arr, mode="LA").save(path)
    else:
        assert cv2.imwrite(str(path), arr)
    np.testing.assert_array_equal(read_mask(path, (16, 20)), fg)


def test_unreadable_mask_type_names_the_file(tmp_path):
    from apmask_lib.data import ImageReadError, read_mask

    path = tmp_path / "float.tiff"
    cv2.imwrite(str(path), np.ones((8, 8), np.float32))
    with pytest.raises(ImageReadError, match="float.tiff"):
        read_mask(path)


# ============================================================================ 8. one run per folder
def test_a_second_run_in_the_same_folder_is_refused(data_root, tmp_path):
    p = child(f"""
        import sys
        from apmask_lib.training.runfolder import RunLock
        with RunLock({str(tmp_path / 'pretrain')!r}):
            print("locked", flush=True)
            sys.stdin.read()
    """, stdin=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match=rf"in use by process {p.pid}"):
            run_pretrain(tiny_cfg(data_root, tmp_path))
    finally:
        p.communicate("", timeout=60)
    assert not (tmp_path / "pretrain" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_a_stale_lock_from_a_dead_process_is_taken_over(data_root, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "pretrain").mkdir(parents=True)
    (tmp_path / "pretrain" / ".lock").write_text(f"{dead.stdout.strip()}\n")
    out = run_pretrain(tiny_cfg(data_root, tmp_path), max_steps=1)
    assert (out / "checkpoint.pt").is_file() and not (out / ".lock").exists()


# ============================================================================ weak list
def test_data_command_verifies_every_file_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("APMASK_CACHE", str(tmp_path / "cache"))
    root = make_mvtec(tmp_path / "data")
    args = ["data", "-S", "data.dataset=mvtec", "-S", f"data.root={root}", "-S", "data.category=bottle"]
    main(args)
    assert "verified" in capsys.readouterr().out
    bad = root / "bottle" / "test" / "crack" / "000.png"
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code != 0 and str(bad) in capsys.readouterr().err
    # the good files are not decoded again (cached by size and mtime)
    import apmask_lib.data.verify as V

    decoded = []
    real = V.check_sample
    monkeypatch.setattr(V, "check_sample", lambda s: decoded.append(s.path) or real(s))
    cv2.imwrite(str(bad), np.zeros((64, 64, 3), np.uint8))
    main(args)
    assert decoded == [bad]


def test_skipped_files_in_train_good_are_reported(tmp_path, caplog):
    from apmask_lib.data import load_mvtec

    root = make_mvtec(tmp_path)
    (root / "bottle/train/good/more").mkdir()
    cv2.imwrite(str(root / "bottle/train/good/more/x.png"), np.zeros((8, 8, 3), np.uint8))
    (root / "bottle/train/good/notes.txt").write_text("x")
    with caplog.at_level("WARNING", logger="apmask"):
        ds = load_mvtec(root, "bottle")
    assert len(ds.train) == 8
    assert any("skipped 2" in r.message and "subfolder" in r.message and "train/good" in r.message
               for r in caplog.records)


def _nih(tmp_path: Path, table: bytes, name: str = "Data_Entry_2017.csv") -> Path:
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / name).write_bytes(table)
    return tmp_path


def test_malformed_nih_table_names_the_file_and_line(tmp_path):
    from apmask_lib.data.nih import load_nih

    text = ("Image Index,Finding Labels,Patient ID,Patient Gender,View Position\n"
            "a.png,No Finding,1,M,PA\n" "b.png,No Finding,2,M,PA,extra,fields\n")
    root = _nih(tmp_path, text.encode())
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv.*line 3"):
        load_nih(root)


def test_truncated_nih_table_names_the_file(tmp_path):
    from apmask_lib.data.nih import load_nih

    blob = gzip.compress(b"Image Index,Finding Labels,Patient ID,Patient Gender,View Position\n" +
                         b"a.png,No Finding,1,M,PA\n" * 2000)
    root = _nih(tmp_path, blob[: len(blob) // 2], "Data_Entry_2017.csv.gz")
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv\.gz"):
        load_nih(root)


@pytest.mark.parametrize("payload", [b"garbage, not a checkpoint", None])
def test_garbage_checkpoint_never_suggests_weights_only_false(tmp_path, payload):
    from apmask_lib.weights import build_backbone
    from apmask_lib.weights import load_detector
    from apmask_lib.core.files import load_checkpoint

    path = tmp_path / "x.pt"
    if payload is None:  # a pickle of an arbitrary object (as DINO's args): refused by weights_only
        import argparse

        torch.save({"args": argparse.Namespace(lr=1)}, path)
    else:
        path.write_bytes(payload)
    for load in (load_checkpoint, load_detector, lambda p: build_backbone(f"file:{p}")):
        with pytest.raises(ValueError) as e:
            load(path)
        msg = str(e.value)
        assert str(path) in msg and "not a valid checkpoint" in msg and "weights_only" not in msg


@pytest.mark.slow
def test_corrupt_offline_backbone_cache_is_rebuilt(tmp_path, monkeypatch):
    from apmask_lib.weights.dinov2_onnx import CACHE_NAME, load_offline_dinov2

    pytest.importorskip("onnx")
    monkeypatch.setenv("APMASK_CACHE", str(tmp_path))
    (tmp_path / CACHE_NAME).write_bytes(b"\x00" * 1000)  # a killed or corrupted write
    with pytest.warns(UserWarning, match=CACHE_NAME):
        model = load_offline_dinov2()
    assert model.embed_dim == 384
    torch.load(tmp_path / CACHE_NAME, weights_only=True)  # rebuilt: a valid file now


def test_a_tiny_checkpoint_cannot_declare_a_huge_architecture(tmp_path):
    """Refused before anything is allocated (unbounded, this asked for ~450 GB)."""
    from apmask_lib.weights import build_backbone
    from apmask_lib.weights import FORMAT, load_detector

    sd = {"patch_embed.proj.weight": torch.zeros(1536, 3, 16, 16), "pos_embed": torch.zeros(1, 197, 1536),
          "blocks.3999.norm1.weight": torch.zeros(1)}
    torch.save(sd, tmp_path / "bb.pt")
    with pytest.raises(ValueError, match="depth"):
        build_backbone(f"file:{tmp_path / 'bb.pt'}")
    torch.save({"format": FORMAT, "vit_config": {"patch_size": 16, "embed_dim": 1536, "depth": 4000, "num_heads": 24},
                "head_config": {}, "state_dict": {}, "config": {}, "meta": {}}, tmp_path / "det.pt")
    with pytest.raises(ValueError, match="depth"):
        load_detector(tmp_path / "det.pt")


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_respect_the_umask(tmp_path, umask, mode):
    from apmask_lib.core.files import atomic_write_text, save_checkpoint

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_checkpoint(tmp_path / "b.pt", step=1)
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "b.pt").stat().st_mode & 0o777 == mode


@pytest.mark.slow
def test_nan_loss_is_one_line_naming_step_terms_and_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    import apmask_lib.finetune.stage as ft
    from apmask_lib.finetune.losses import finetune_loss

    calls = []

    def bad(*args, **kw):
        calls.append(1)
        total, ld, ls = finetune_loss(*args, **kw)
        return (total * float("nan"), ld, ls * float("inf")) if len(calls) > 2 else (total, ld, ls)

    monkeypatch.setattr(ft, "finetune_loss", bad)
    with pytest.raises(SystemExit) as e:
        # no validation slice: all 8 images train, so the run has the steps the NaN is planted in
        main(["finetune", *tiny_args(data_root, tmp_path), "-S", "finetune.val_fraction=0"])
    assert e.value.code != 0
    out = capsys.readouterr().err  # progress bars, then the error
    assert "Traceback" not in out and out.count("apmask finetune: error") == 1
    err = out[out.index("apmask finetune: error"):]
    assert err.endswith("\n") and err.count("\n") == 1  # one line
    assert "step 2" in err and "loss_det" in err and "loss_seg=inf" in err
    assert str(tmp_path / "finetune" / "checkpoint.pt") in err and "step 2" in err
