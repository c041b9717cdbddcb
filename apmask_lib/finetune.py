"""Fine-tuning on attention-guided synthetic anomalies (paper Sec. 3.2).

The pre-trained backbone plus a detection head and an attention-based segmentation map
(:class:`~apmask_lib.models.detector.AnomalyDetector`) learn to tell normal training images from
synthetic anomalies made of them (:mod:`apmask_lib.anomalies`), with
L = det_weight · BCE + seg_weight · Dice (0.95 / 0.05; :func:`~apmask_lib.losses.finetune_loss`).

One step, for a batch of B training images (``finetune.batch_size``):

1. Every image is augmented (horizontal flip with probability ``hflip``, by default 0 for chest X-rays
   and 0.5 otherwise, :func:`resolve_hflip`; colour jitter
   ``normal_jitter``); ``round(anomaly_fraction · B)`` randomly chosen ones then become synthetic
   anomalies of kind ``finetune.anomaly``; the others stay normal (label 0, all-zero mask).
   For the paper's kind ``attention`` the paste distribution is the mean [CLS] attention of the
   *normal* image under the **initial** backbone (frozen, no gradient), computed once per image
   at the start of the run at the training resolution and stored in the checkpoint, so a resumed
   run uses the same maps. ``nsa``/``fpi`` take their source patch from another, randomly chosen
   training image.
2. Poisson blending: ``finetune.poisson`` "auto" = on for chest X-rays (``data.dataset == "nih"``);
   ``finetune.blend`` "auto" = MIXED_CLONE for X-rays and MVTec textures, NORMAL_CLONE otherwise.
3. AdamW (no weight decay on biases, norms, position embedding, [CLS] token), learning rate
   linear warm-up ``start_lr -> lr`` over ``warmup_epochs`` then cosine to ``min_lr``
   (:func:`~apmask_lib.optim.cosine_scheduler`, as pre-training), gradient clipping, bf16 autocast
   on CUDA.

Batches are made on the CPU by :class:`SyntheticBatches`, in ``num_workers`` DataLoader workers
(or the main process when 0). Batch ``t`` is a pure function of (seed, t): the image order comes
from (seed, epoch), the anomaly randomness from a generator seeded with (seed, t). So the result
does not depend on the number of workers, and resuming needs no data-loader state.

Engineering as pre-training: checkpoint (atomic) at every epoch end and when stopping, exact
resume (model, optimiser, step, RNG state, attention maps), a configuration check on resume,
progress bar, log.csv per step (losses read back every ``log_every`` steps), log.jsonl per epoch,
NaN/inf -> clear error, a finished run is not retrained. Outputs in ``<out_dir>/finetune``:
checkpoint.pt, model.pt (:func:`~apmask_lib.weights.save_detector`, written where the run
stops; its ``meta`` holds step, total_steps and done), log.csv, log.jsonl, config.json, and done.json
written last where the run stops (:mod:`apmask_lib.runfolder`: lock, done marker, no overwriting
without ``force``; the same rules as pre-training).
"""
from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .anomalies import anomaly_batch
from .config import Config
from .fastpath import compile_blocks
from .losses import finetune_loss
from .models import VisionTransformer
from .weights import build_backbone
from .models.detector import AnomalyDetector
from .weights import save_detector
from . import runfolder
from .validation import COLUMNS as VAL_COLUMNS, holdout_indices, make_validation_set, score_validation
from .devices import accelerated, autocast_context, resolve_device
from .files import append_jsonl, CSVLog, save_checkpoint, truncate_jsonl, write_json
from .fingerprint import config_fingerprint, load_resume_checkpoint
from .nonfinite import check_finite
from .optim import cosine_scheduler, param_groups
from .rng import rng_state, seed_everything, set_rng_state

CSV_COLUMNS = ("step", "epoch", "loss", "loss_det", "loss_seg", "lr", "step_time", "images_per_s")
# config keys that do not change the trained weights (may differ on resume)
_RESUME_IGNORED = {("finetune", "num_workers"), ("finetune", "log_every"), ("finetune", "compile"),
                   ("pretrain", "compile"), ("pretrain", "num_workers"),
                   ("pretrain", "log_every"), ("device",), ("out_dir",), ("evaluate",), ("data", "max_test")}


# ----------------------------------------------------------------------------- settings
def resolve_poisson(cfg: Config) -> bool:
    """``finetune.poisson``: on | off | auto (on for chest X-rays, ``data.dataset == "nih"``)."""
    v = cfg.finetune.poisson  # one of config.Poisson (YAML booleans read as on/off)
    return cfg.data.dataset == "nih" if v == "auto" else v == "on"


def resolve_blend(cfg: Config) -> str:
    """``finetune.blend``: normal | mixed | auto (mixed for X-rays and MVTec textures)."""
    v = cfg.finetune.blend
    if v == "auto":
        from .data.mvtec import TEXTURES

        return "mixed" if cfg.data.dataset == "nih" or cfg.data.category in TEXTURES else "normal"
    return v


def resolve_hflip(cfg: Config) -> float:
    """``finetune.hflip``, or by dataset when None: 0 for chest X-rays (``data.dataset == "nih"``; a
    mirrored X-ray puts the heart on the wrong side, an anomaly the test set never shows), 0.5 otherwise."""
    h = cfg.finetune.hflip
    if h is None:
        return 0.0 if cfg.data.dataset == "nih" else 0.5
    if not 0.0 <= float(h) <= 1.0:
        raise ValueError(f"finetune.hflip must be a probability in [0, 1] or null (by dataset), got {h!r}")
    return float(h)


def initial_backbone(cfg: Config) -> VisionTransformer:
    """``finetune.init``: "pretrain" = ``<out_dir>/pretrain/backbone.pt``, else a backbone source."""
    src = cfg.finetune.init
    if src == "pretrain":
        path = Path(cfg.out_dir) / "pretrain" / "backbone.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"finetune.init='pretrain' needs the pre-trained backbone {path}, which does not exist. "
                f"Run pre-training first with the same out_dir (apmask pretrain / run_pretrain), or fine-tune "
                f"from a backbone source instead, e.g. finetune.init={cfg.backbone} (no APMask pre-training).")
        return build_backbone(f"file:{path}")
    return build_backbone(src, seed=cfg.seed)


def build_detector(cfg: Config, backbone: VisionTransformer) -> AnomalyDetector:
    """The detector on ``backbone``; the detection MLP has the pre-training head's sizes."""
    return AnomalyDetector(backbone, hidden_dim=cfg.pretrain.hidden_dim, bottleneck_dim=cfg.pretrain.bottleneck_dim,
                           seg_maps=cfg.finetune.seg_maps, seg_transform=cfg.finetune.seg_transform)


# ----------------------------------------------------------------------------- data
def load_train_images(dataset, samples: Sequence, size: int, num_workers: int = 2, progress: bool = True) -> np.ndarray:
    """Decode and resize the training images once: uint8 (N, size, size, 3). Threads (OpenCV
    releases the GIL)."""
    from .data import resize_image

    def load(s):
        return resize_image(dataset.image(s), size)

    with ThreadPoolExecutor(max(1, num_workers)) as ex:
        imgs = list(tqdm(ex.map(load, samples), total=len(samples), desc="load images",
                         disable=not progress or len(samples) < 2, leave=False))
    return np.stack(imgs)


@torch.no_grad()
def attention_maps(backbone: VisionTransformer, images: np.ndarray, device: torch.device, batch_size: int = 32,
                   progress: bool = True) -> np.ndarray:
    """Mean [CLS] attention (Eq. 2) of every image under ``backbone``: float32 (N, h, w)."""
    backbone.eval()
    autocast = autocast_context(device)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="attention maps", disable=not progress, leave=False):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 255.0
        with autocast:
            out.append(backbone.saliency(x).float().cpu())
    return torch.cat(out).numpy()


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


class SyntheticBatches(Dataset):
    """Map-style dataset whose item ``t`` is training batch ``t`` (a pure function of (seed, t)).

    images: uint8 (N, H, W, 3) normal training images; attentions: (N, h, w) or None.
    Item: {"images": uint8 (B, 3, H, W), "masks": bool (B, H, W), "labels": float32 (B,)}.
    """

    def __init__(self, images: np.ndarray, attentions: Optional[np.ndarray], batch_size: int, seed: int,
                 kind: str = "attention", fraction: float = 0.5, hflip: float = 0.5, normal_jitter: float = 0.05,
                 **anomaly_kwargs):
        # torch tensors: pickled to spawned workers through shared memory, not copied
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.attentions = None if attentions is None else torch.from_numpy(np.ascontiguousarray(attentions))
        self.n = len(images)
        self.batch_size, self.seed = batch_size, seed
        self.kind, self.fraction = kind, fraction
        self.hflip, self.normal_jitter = hflip, normal_jitter
        self.kwargs = anomaly_kwargs
        self.steps_per_epoch = max(1, self.n // batch_size)  # drop_last; images repeat within a batch when n < B
        self._order: tuple[int, Optional[np.ndarray]] = (-1, None)
        if kind == "attention" and attentions is None:
            raise ValueError("kind 'attention' needs the attention maps of the training images")

    def indices(self, step: int) -> np.ndarray:
        """Image indices of batch ``step``: epoch permutation from (seed, epoch), tiled when N < B."""
        epoch, it = divmod(int(step), self.steps_per_epoch)
        if self._order[0] != epoch:
            rng = _seed(self.seed, 7919, epoch)
            reps = -(-self.steps_per_epoch * self.batch_size // self.n)
            self._order = (epoch, np.concatenate([rng.permutation(self.n) for _ in range(reps)]))
        return self._order[1][it * self.batch_size:(it + 1) * self.batch_size]

    def __len__(self) -> int:  # nominal; the sampler decides which steps are drawn
        return self.steps_per_epoch

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        rng = _seed(self.seed, 104729, step)
        idx = self.indices(step)
        sources = None
        if self.kind in ("nsa", "fpi") and self.n > 1:
            other = rng.integers(0, self.n - 1, size=len(idx))
            other = other + (other >= idx)
            sources = [self.images[j].numpy() for j in other]
        atts = None if self.attentions is None else [self.attentions[i].numpy() for i in idx]
        ims, masks, labels = anomaly_batch([self.images[i].numpy() for i in idx], rng, self.kind, self.fraction,
                                           attentions=atts, sources=sources, hflip=self.hflip,
                                           normal_jitter=self.normal_jitter, **self.kwargs)
        return {"images": torch.from_numpy(ims).permute(0, 3, 1, 2).contiguous(),
                "masks": torch.from_numpy(masks), "labels": torch.from_numpy(labels).float()}


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def batch_loader(batches: SyntheticBatches, start: int, stop: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Yields batches ``start .. stop-1`` in order (``num_workers`` processes, 0 = main process).

    Workers are *spawned*, not forked: a forked child inherits OpenCV's pthread pool (and torch's
    OpenMP pool) in a broken state once the parent has used them, and then hangs in its first
    parallel cv2 call (``cv2.setNumThreads``, ``resize``, ``seamlessClone``)."""
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw = {"worker_init_fn": _worker_init, "prefetch_factor": 4, "multiprocessing_context": "spawn"}
    return DataLoader(batches, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                      pin_memory=pin_memory, **kw)


def make_batches(cfg: Config, images: np.ndarray, attentions: Optional[np.ndarray]) -> SyntheticBatches:
    f = cfg.finetune
    return SyntheticBatches(images, attentions, min(f.batch_size, len(images)), cfg.seed, kind=f.anomaly, fraction=f.anomaly_fraction, hflip=resolve_hflip(cfg),
                            normal_jitter=f.normal_jitter, poisson=resolve_poisson(cfg), blend=resolve_blend(cfg),
                            temperature=f.attention_temperature)


# ----------------------------------------------------------------------------- one step
def train_step(model: AnomalyDetector, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], f,
               device: torch.device, autocast=None) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch of :class:`SyntheticBatches`; ``f`` = ``cfg.finetune``
    (loss weights, Dice reduction, gradient clipping). Returns detached device scalars
    (loss, loss_det, loss_seg, acc) so the caller decides when to sync."""
    x = batch["images"].to(device, non_blocking=True).float().div_(255.0)
    masks = batch["masks"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    with autocast if autocast is not None else contextlib.nullcontext():
        o = model(x)
    loss, l_det, l_seg = finetune_loss(o.logit, o.seg_logits, labels, masks, f.det_weight, f.seg_weight, f.dice)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if f.clip_grad and f.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), f.clip_grad)
    optimizer.step()
    acc = ((o.logit.detach() > 0).float() == labels).float().mean()
    return {"loss": loss.detach(), "loss_det": l_det.detach(), "loss_seg": l_seg.detach(), "acc": acc}


_OUTPUTS = ("checkpoint.pt", "model.pt")  # the files done.json vouches for


# ----------------------------------------------------------------------------- the run
def run_finetune(cfg: Config, dataset=None, max_steps: Optional[int] = None, resume: bool = True,
                 progress: bool = True, force: bool = False) -> Path:
    """Fine-tune on synthetic anomalies; returns ``Path(cfg.out_dir) / "finetune"`` (files: module
    docstring; the detector is ``model.pt``).

    dataset:   an :class:`~apmask_lib.data.AnomalyDataset` (``train`` split, capped at
               ``cfg.data.max_train``); None builds it from ``cfg.data``.
    max_steps: stop once the global step reaches this (tests, smoke runs). The schedule stays that
               of the full ``finetune.epochs`` run; calling again continues it exactly. ``model.pt``
               is written at the stop too (its ``meta`` says ``done=False``).
    resume:    continue from ``checkpoint.pt`` when present (a finished run returns at once, after
               checking ``done.json``); False starts afresh -- refused, like a missing checkpoint,
               where the folder holds finished outputs, unless ``force``.
    force:     discard what the folder holds (checkpoint, model.pt, logs) and train from scratch.
    A second run in the same folder is refused (:class:`~apmask_lib.runfolder.RunLocked`).
    """
    out = Path(cfg.out_dir) / "finetune"
    with runfolder.RunLock(out):
        runfolder.sweep_temporaries(out)
        return _run(cfg, dataset, max_steps, resume and not force, progress, force, out)


def _run(cfg: Config, dataset, max_steps: Optional[int], resume: bool, progress: bool, force: bool, out: Path) -> Path:
    f = cfg.finetune
    poisson, blend = resolve_poisson(cfg), resolve_blend(cfg)
    ckpt_path, model_path = out / "checkpoint.pt", out / "model.pt"
    fingerprint = config_fingerprint(cfg, _RESUME_IGNORED)
    device = resolve_device(cfg.device)

    ckpt = None
    if resume and ckpt_path.is_file():
        ckpt = load_resume_checkpoint(ckpt_path, fingerprint)
        if runfolder.finished(runfolder.read_marker(out, _OUTPUTS), max_steps):
            return out
        # otherwise go on from the checkpoint; where it already covers this call no step runs and
        # model.pt is re-derived from it below
    else:
        runfolder.guard(out, ("model.pt",), force)
    runfolder.clear_marker(out)  # before anything in the folder changes

    # ---- data
    if dataset is None:
        from .data import dataset_from_config

        dataset = dataset_from_config(cfg.data)
    all_train = list(dataset.train)
    keep, held = holdout_indices(len(all_train), f.val_fraction, f.val_max_images)  # validation slice (validation.py)
    train = [all_train[i] for i in keep][: cfg.data.max_train]
    held_out = [all_train[i] for i in held]
    if len(train) < 2:
        raise ValueError(f"fine-tuning needs at least 2 training images (normal and synthetic samples per batch); "
                         f"{getattr(dataset, 'name', 'the dataset')} has {len(train)} (data.max_train={cfg.data.max_train})")
    images = load_train_images(dataset, train + held_out, cfg.data.image_size, max(1, f.num_workers), progress)

    # ---- model (seeded) and the initial backbone's attention maps
    seed_everything(cfg.seed)
    backbone = initial_backbone(cfg)
    if cfg.data.image_size % backbone.patch_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} is not a multiple of the backbone's patch size "
                         f"{backbone.patch_size}")
    backbone = backbone.to(device)
    attentions = None
    if ckpt is not None and ckpt.get("attention") is not None:
        attentions = ckpt["attention"].numpy()
    elif f.anomaly == "attention":
        attentions = attention_maps(backbone, images, device, progress=progress)
    att_all, n_tr = attentions, len(train)  # maps of training + held-out images, as stored in the checkpoint
    images, val_images = images[:n_tr], images[n_tr:]
    val_set = None if not len(val_images) else make_validation_set(
        val_images, None if attentions is None else attentions[n_tr:], f.anomaly, sources=images, poisson=poisson,
        blend=blend, temperature=f.attention_temperature)
    attentions = None if attentions is None else attentions[:n_tr]
    model = build_detector(cfg, backbone).to(device)
    batches = make_batches(cfg, images, attentions)
    iters = batches.steps_per_epoch
    total = f.epochs * iters
    stop = total if max_steps is None else min(total, max_steps)
    lrs = cosine_scheduler(f.lr, f.min_lr, f.epochs, iters, f.warmup_epochs, f.start_lr)
    fused = accelerated(device)
    optimizer = torch.optim.AdamW(param_groups(model), lr=f.lr, weight_decay=f.weight_decay,
                                  **({"fused": True} if fused else {}))
    start, acc = 0, {"loss": [], "loss_det": [], "loss_seg": [], "acc": []}
    if ckpt is not None:
        if ckpt["iters_per_epoch"] != iters:
            raise ValueError(f"{ckpt_path}: {ckpt['iters_per_epoch']} iterations per epoch, now {iters} "
                             "(training set or batch size changed); use another out_dir")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start, acc = int(ckpt["step"]), {k: list(v) for k, v in ckpt["epoch_acc"].items()}
    autocast = autocast_context(device)
    compile_blocks(model.backbone, f.compile)  # in place, after the checkpoint load (apmask_lib/fastpath.py)

    # ---- files
    out.mkdir(parents=True, exist_ok=True)
    csv = CSVLog(out / "log.csv", CSV_COLUMNS)
    if ckpt is None:
        for p in (out / "log.csv", out / "log.jsonl"):
            p.unlink(missing_ok=True)
    else:
        csv.truncate_after(start)
        truncate_jsonl(out / "log.jsonl", start // iters)
    write_json(out / "config.json", {**cfg.to_dict(), "_run": {
        "n_train": len(images), "n_val_images": len(val_images), "batch_size": batches.batch_size, "iters_per_epoch": iters, "total_steps": total,
        "device": str(device), "poisson": poisson, "blend": blend, "hflip": resolve_hflip(cfg), "init": f.init,
        "attention_grid": None if attentions is None else list(attentions.shape[1:])}})

    att_tensor = None if att_all is None else torch.from_numpy(np.ascontiguousarray(att_all, dtype=np.float32))
    val_csv = CSVLog(out / "validation.csv", VAL_COLUMNS)
    if ckpt is None:
        (out / "validation.csv").unlink(missing_ok=True)
    else:
        val_csv.truncate_after(start // iters, key="epoch")

    def export(step: int) -> None:
        """model.pt, then done.json (last): where this call stops."""
        save_detector(model_path, model, cfg.to_dict(), meta={"step": step, "total_steps": total, "done": step >= total})
        runfolder.write_marker(out, _OUTPUTS, stage="finetune", step=step, total_steps=total, done=step >= total)

    def save(step: int, done: bool, final: bool) -> None:
        """Checkpoint (every epoch end and at the stop); model.pt and done.json only where the run stops."""
        save_checkpoint(ckpt_path, model=model, optimizer=optimizer, step=step, iters_per_epoch=iters, done=done,
                        config=json.dumps(fingerprint), rng=rng_state(), attention=att_tensor,
                        epoch_acc={k: list(v) for k, v in acc.items()})
        if final:
            export(step)

    pending: list[dict[str, Any]] = []
    bar = tqdm(total=stop, initial=start, desc="finetune", disable=not progress, dynamic_ncols=True)

    def flush() -> None:
        if not pending:
            return
        vals = torch.stack([torch.stack([r["loss"], r["loss_det"], r["loss_seg"], r["acc"]]) for r in pending])
        for r, (lo, ld, ls, ac) in zip(pending, vals.float().cpu().tolist()):
            check_finite(lo, "fine-tuning loss", r["step"], terms={"loss": lo, "loss_det": ld, "loss_seg": ls},
                         checkpoint=ckpt_path)
            r.update(loss=lo, loss_det=ld, loss_seg=ls, acc=ac)
            for k in acc:
                acc[k].append(r[k])
            csv.write(r)
        bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}")
        pending.clear()

    model.train()
    epoch_t0 = t_last = time.perf_counter()
    loader = batch_loader(batches, start, stop, f.num_workers, pin_memory=device.type == "cuda")
    for step, batch in zip(range(start, stop), loader):
        epoch, it = divmod(step, iters)
        lr = float(lrs[step])
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = train_step(model, optimizer, batch, f, device, autocast)

        now = time.perf_counter()
        dt, t_last = now - t_last, now
        pending.append({"step": step, "epoch": epoch, **losses, "lr": lr, "step_time": dt,
                        "images_per_s": len(batch["labels"]) / max(dt, 1e-9)})
        bar.update(1)
        end_of_epoch = it == iters - 1
        if len(pending) >= max(1, f.log_every) or end_of_epoch or step == stop - 1:
            flush()
        if end_of_epoch:
            secs = time.perf_counter() - epoch_t0
            record = {"epoch": epoch, "step": step + 1, "lr": lr, "time_s": secs,
                      **{k: float(np.mean(v)) for k, v in acc.items()},
                      "images_per_s": len(acc["loss"]) * batches.batch_size / max(secs, 1e-9)}
            if val_set is not None:  # label-free validation signal (apmask_lib/validation.py)
                record.update(score_validation(model, val_set, device, f, autocast=autocast))
                val_csv.write(record)
            append_jsonl(out / "log.jsonl", record)
            for v in acc.values():
                v.clear()
            epoch_t0 = time.perf_counter()
            save(step + 1, done=step + 1 == total, final=step == stop - 1)
        elif step == stop - 1:
            save(step + 1, done=False, final=True)
    bar.close()
    if start >= stop:  # nothing to train: the checkpoint covers this call; re-derive model.pt from it
        export(start)
    return out


__all__ = ["CSV_COLUMNS", "resolve_poisson", "resolve_blend", "resolve_hflip", "initial_backbone", "build_detector", "param_groups",
           "load_train_images", "attention_maps", "SyntheticBatches", "batch_loader", "make_batches", "train_step",
           "run_finetune"]
