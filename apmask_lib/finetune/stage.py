"""Fine-tuning on attention-guided synthetic anomalies (paper Sec. 3.2).

The pre-trained backbone plus a detection head and an attention-based segmentation map
(:class:`~apmask_lib.models.detector.AnomalyDetector`) learn to tell normal training images from
synthetic anomalies made of them (:mod:`apmask_lib.finetune.anomalies`), with
L = det_weight · BCE + seg_weight · Dice (0.95 / 0.05; :func:`~apmask_lib.finetune.losses.finetune_loss`).

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
   (:func:`~apmask_lib.core.optim.cosine_scheduler`, as pre-training), gradient clipping, bf16 autocast
   on CUDA. Optional stabilisers, off by default: a lower learning rate for the backbone than for the
   new heads (``backbone_lr_scale``), layer-wise decay (``layer_decay``), and an exponential moving
   average of the weights (``ema``, :class:`WeightAverage`) that model.pt and the validation signal use.

Batches are made on the CPU by :class:`~apmask_lib.finetune.batches.SyntheticBatches`, in ``num_workers`` DataLoader workers
(or the main process when 0). Batch ``t`` is a pure function of (seed, t): the image order comes
from (seed, epoch), the anomaly randomness from a generator seeded with (seed, t). So the result
does not depend on the number of workers, and resuming needs no data-loader state.

Engineering as pre-training: checkpoint (atomic) at every epoch end and when stopping, exact
resume (model, optimiser, step, RNG state, attention maps), a configuration check on resume,
progress bar, log.csv per step (losses read back every ``log_every`` steps), log.jsonl per epoch,
NaN/inf -> clear error, a finished run is not retrained. Outputs in ``<out_dir>/finetune``:
checkpoint.pt, model.pt (:func:`~apmask_lib.weights.save_detector`, written where the run
stops; its ``meta`` holds step, total_steps and done), log.csv, log.jsonl, config.json, and done.json
written last where the run stops (:mod:`apmask_lib.training.runfolder`: lock, done marker, no overwriting
without ``force``; the same rules, steps, loop and progress lines as pre-training: :mod:`apmask_lib.training.stage`,
in which :class:`FinetuneStage` says what fine-tuning adds, and :mod:`apmask_lib.training.loop`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Config
from ..data.types import cap_train
from .anomalies import needs_attention
from .batches import SyntheticBatches, attention_maps, batch_loader, load_train_images
from ..core.fastpath import compile_blocks
from .losses import finetune_loss
from ..models import VisionTransformer
from ..models.detector import AnomalyDetector
from ..training.runfolder import RunFolder, resume_ignored
from ..training.loop import TrainLoop
from ..training.stage import Stage
from ..core.devices import accelerated, autocast_context, resolve_device
from ..core.optim import cosine_scheduler, ema_update, optimizer_step, param_groups, set_lr
from ..core.rng import seed_everything
from ..weights import build_backbone, save_detector
from .validation import COLUMNS as VAL_COLUMNS, ValidationSet, holdout_indices, make_validation_set, score_validation

CSV_COLUMNS = ("step", "epoch", "loss", "loss_det", "loss_seg", "lr", "step_time", "images_per_s")
# config keys that do not change the trained weights (may differ on resume)
_RESUME_IGNORED = resume_ignored("finetune", "pretrain")


# ----------------------------------------------------------------------------- settings
def resolve_poisson(cfg: Config) -> bool:
    """``finetune.poisson``: on | off | auto (on for chest X-rays, ``data.dataset == "nih"``)."""
    v = cfg.finetune.poisson  # one of config.Poisson (YAML booleans read as on/off)
    return cfg.data.dataset == "nih" if v == "auto" else v == "on"


def resolve_blend(cfg: Config) -> str:
    """``finetune.blend``: normal | mixed | auto (mixed for X-rays and MVTec textures)."""
    v = cfg.finetune.blend
    if v == "auto":
        from ..data.mvtec import TEXTURES

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
    with autocast or contextlib.nullcontext():
        o = model(x)
    loss, l_det, l_seg = finetune_loss(o.logit, o.seg_logits, labels, masks, f.det_weight, f.seg_weight, f.dice)
    optimizer_step(optimizer, loss, model, f.clip_grad)
    acc = ((o.logit.detach() > 0).float() == labels).float().mean()
    return {"loss": loss.detach(), "loss_det": l_det.detach(), "loss_seg": l_seg.detach(), "acc": acc}


# ----------------------------------------------------------------------------- weight average
class WeightAverage:
    """An exponential moving average of a model's weights (``finetune.ema``), for evaluation.

    After step t (counted from 0) ``avg <- m_t · avg + (1 − m_t) · weights`` with the warmed-up
    momentum ``m_t = min(m, (1 + t) / (10 + t))`` (timm's ``ModelEmaV3`` warm-up), so the average of
    a short run is not dominated by the untrained starting weights. Buffers are copied. ``model``:
    the averaged copy (a deep copy of the model at construction, no gradients)."""

    def __init__(self, model: torch.nn.Module, momentum: float):
        import copy

        if not 0.0 < momentum < 1.0:
            raise ValueError(f"finetune.ema must lie in (0, 1) to average (0 = off), got {momentum}")
        self.momentum = float(momentum)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    def momentum_at(self, step: int) -> float:
        return min(self.momentum, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        ema_update(self.model, model, self.momentum_at(step))
        for b_avg, b in zip(self.model.buffers(), model.buffers()):
            b_avg.copy_(b)


# ----------------------------------------------------------------------------- the state
@dataclass
class FinetuneState:
    """What a fine-tuning run trains (:func:`build_finetune_state`)."""

    images: np.ndarray                 # uint8 (N, S, S, 3) training images at data.image_size
    attentions: Optional[np.ndarray]   # (N + M, h, w) initial-backbone maps of training + held-out images, or None
    val_set: Optional[ValidationSet]   # the held-out images and their synthetic anomalies (validation.py), or None
    n_val_images: int
    model: AnomalyDetector
    batches: SyntheticBatches
    iters: int                         # steps per epoch
    total: int                         # steps of the whole schedule
    lrs: np.ndarray                    # per-step learning rate
    optimizer: torch.optim.Optimizer
    ema: Optional["WeightAverage"] = None  # finetune.ema > 0: the averaged weights that model.pt and validation use


def build_finetune_state(cfg: Config, dataset=None, device: torch.device | str = "cpu", progress: bool = False,
                         attentions: Optional[np.ndarray] = None) -> FinetuneState:
    """Data, model, batches, schedule and optimiser of a fine-tuning run, before any checkpoint is
    loaded: the training split without the validation hold-out (:func:`~apmask_lib.finetune.validation.holdout_indices`),
    capped at ``data.max_train``, decoded once; the detector on :func:`initial_backbone` (seeded by
    ``cfg.seed``); for ``anomaly="attention"`` the initial backbone's attention maps of the training and
    held-out images (``attentions``: the ones stored in a checkpoint, reused); the validation set;
    :class:`SyntheticBatches`; the LR schedule; AdamW (fused where :func:`~apmask_lib.core.devices.accelerated`)."""
    f = cfg.finetune
    device = torch.device(device)
    if dataset is None:
        from ..data import dataset_from_config

        dataset = dataset_from_config(cfg.data)
    all_train = list(dataset.train)
    keep, held = holdout_indices(len(all_train), f.val_fraction, f.val_max_images)  # validation slice (validation.py)
    train = cap_train([all_train[i] for i in keep], cfg.data.max_train)
    held_out = [all_train[i] for i in held]
    if len(train) < 2:
        raise ValueError(f"fine-tuning needs at least 2 training images (normal and synthetic samples per batch); "
                         f"{getattr(dataset, 'name', 'the dataset')} has {len(train)} (data.max_train={cfg.data.max_train})")
    images = load_train_images(dataset, train + held_out, cfg.data.image_size, max(1, f.num_workers), progress)

    seed_everything(cfg.seed)
    backbone = initial_backbone(cfg)
    if cfg.data.image_size % backbone.patch_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} is not a multiple of the backbone's patch size "
                         f"{backbone.patch_size}")
    backbone = backbone.to(device)
    if attentions is None and needs_attention(f.anomaly):
        attentions = attention_maps(backbone, images, device, progress=progress)
    n_tr = len(train)
    images, val_images = images[:n_tr], images[n_tr:]
    val_set = None if not len(val_images) else make_validation_set(
        val_images, None if attentions is None else attentions[n_tr:], f.anomaly, sources=images,
        poisson=resolve_poisson(cfg), blend=resolve_blend(cfg), temperature=f.attention_temperature)
    model = build_detector(cfg, backbone).to(device)
    batches = make_batches(cfg, images, None if attentions is None else attentions[:n_tr])
    iters = batches.steps_per_epoch
    lrs = cosine_scheduler(f.lr, f.min_lr, f.epochs, iters, f.warmup_epochs, f.start_lr)
    fused = accelerated(device)
    groups = param_groups(model, layer_decay=f.layer_decay, backbone_scale=f.backbone_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=f.lr, weight_decay=f.weight_decay, **({"fused": True} if fused else {}))
    ema = WeightAverage(model, f.ema) if f.ema > 0 else None
    return FinetuneState(images, attentions, val_set, len(val_images), model, batches, iters, f.epochs * iters, lrs,
                         optimizer, ema)


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
    progress:  a bar on a terminal, one line per epoch elsewhere (:mod:`apmask_lib.training.loop`).
    A second run in the same folder is refused (:class:`~apmask_lib.training.runfolder.RunLocked`).
    """
    run = RunFolder(cfg.out_dir, "finetune", ("model.pt",), _RESUME_IGNORED)
    with run.locked():
        return FinetuneStage(cfg, run).train(dataset, max_steps, resume and not force, force, progress)


class FinetuneStage(Stage):
    """Fine-tuning in the shared training shell (:class:`~apmask_lib.training.stage.Stage`): the state
    of :func:`build_finetune_state` (the initial backbone's attention maps come from the checkpoint on
    resume), one :func:`train_step` a step on a :class:`SyntheticBatches` batch (then the weight
    average), the validation signal in every epoch record, ``model.pt`` where the call stops."""

    csv_columns = CSV_COLUMNS
    keys = ("loss", "loss_det", "loss_seg", "acc")
    terms = ("loss", "loss_det", "loss_seg")
    what = "fine-tuning loss"
    epoch_csvs = {"validation.csv": VAL_COLUMNS}

    def __init__(self, cfg: Config, run: RunFolder):
        super().__init__(cfg, run)
        self.device = resolve_device(cfg.device)

    def build(self, dataset, ckpt: Optional[dict], show_progress: bool) -> None:
        stored = None if ckpt is None or ckpt.get("attention") is None else ckpt["attention"].numpy()
        self.st = st = build_finetune_state(self.cfg, dataset, self.device, show_progress, attentions=stored)
        self.iters, self.total, self.log_every = st.iters, st.total, self.cfg.finetune.log_every
        self.evaluated = st.model if st.ema is None else st.ema.model  # what model.pt and the validation signal hold
        self.att_tensor = None if st.attentions is None else \
            torch.from_numpy(np.ascontiguousarray(st.attentions, dtype=np.float32))

    def restore(self, ckpt: dict) -> dict:
        st = self.st
        st.model.load_state_dict(ckpt["model"])
        st.optimizer.load_state_dict(ckpt["optimizer"])
        if st.ema is not None:
            if ckpt.get("ema") is None:
                raise ValueError(f"{self.run.checkpoint} holds no weight average (finetune.ema={self.cfg.finetune.ema}): "
                                 "it was written without one; resume with the same finetune.ema or start afresh (force)")
            st.ema.model.load_state_dict(ckpt["ema"])
        return ckpt["epoch_acc"]

    def prepare(self) -> None:
        self.autocast = autocast_context(self.device)
        compile_blocks(self.st.model.backbone, self.cfg.finetune.compile)  # in place, after the checkpoint load

    def run_info(self) -> dict:
        st, cfg = self.st, self.cfg
        return {"n_train": len(st.images), "n_val_images": st.n_val_images, "batch_size": st.batches.batch_size,
                "iters_per_epoch": st.iters, "total_steps": st.total, "device": str(self.device),
                "poisson": resolve_poisson(cfg), "blend": resolve_blend(cfg), "hflip": resolve_hflip(cfg),
                "init": cfg.finetune.init,
                "attention_grid": None if st.attentions is None else list(st.attentions.shape[1:])}

    def items(self):
        self.st.model.train()
        return batch_loader(self.st.batches, self.start, self.stop, self.cfg.finetune.num_workers,
                            pin_memory=self.device.type == "cuda")

    def step(self, step: int, batch: dict) -> tuple[dict, int, dict]:
        st = self.st
        lr = float(st.lrs[step])
        set_lr(st.optimizer, lr)
        losses = train_step(st.model, st.optimizer, batch, self.cfg.finetune, self.device, self.autocast)
        if st.ema is not None:
            st.ema.update(st.model, step)
        return losses, len(batch["labels"]), {"lr": lr}

    def state(self) -> tuple[dict, dict]:
        st = self.st
        return ({"model": st.model, "optimizer": st.optimizer},
                {"attention": self.att_tensor, "epoch_acc": {k: list(v) for k, v in self.loop.means.items()},
                 **({} if st.ema is None else {"ema": st.ema.model.state_dict()})})

    def epoch_record(self, loop: TrainLoop, epoch: int, step: int, secs: float) -> dict:
        st = self.st
        record = {"epoch": epoch, "step": step, "lr": loop.last["lr"], "time_s": secs, **loop.epoch_means(),
                  "images_per_s": len(loop.means["loss"]) * st.batches.batch_size / max(secs, 1e-9)}
        if st.val_set is not None:  # label-free validation signal (apmask_lib/finetune/validation.py)
            record.update(score_validation(self.evaluated, st.val_set, self.device, self.cfg.finetune,
                                           autocast=self.autocast))
            self.logs["validation.csv"].write(record)
        return record

    def export(self, step: int) -> None:
        """model.pt: where this call stops (done.json follows, written by the shell)."""
        save_detector(self.run / "model.pt", self.evaluated, self.cfg.to_dict(),
                      meta={"step": step, "total_steps": self.st.total, "done": step >= self.st.total})


__all__ = ["CSV_COLUMNS", "resolve_poisson", "resolve_blend", "resolve_hflip", "initial_backbone", "build_detector",
           "param_groups", "WeightAverage", "load_train_images", "attention_maps", "SyntheticBatches", "batch_loader", "make_batches",
           "train_step", "FinetuneState", "build_finetune_state", "FinetuneStage", "run_finetune"]
