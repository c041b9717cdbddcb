"""APMask pre-training (paper Sec. 3.1, Eq. 1-4): SwAV with an EMA teacher, multi-crop, and
attention-guided token dropping in the student.

One step, for a batch of B images (all sizes from :class:`~apmask_lib.config.PretrainConfig`):

1. **Views** (:mod:`apmask_lib.pretrain.multicrop`): an unmasked global view for the teacher, one global
   and ``n_local`` local views for the student (``teacher_view`` says whether the teacher's view
   is a second global crop, the default as in DINO/SwAV, or the student's own global crop).
2. **Teacher** (EMA of the student: backbone + projection + prototypes, no gradient): its
   prototype scores on the teacher view become codes by Sinkhorn-Knopp over the batch
   (:func:`~apmask_lib.pretrain.sinkhorn.sinkhorn`, all ranks together). For ``mask="apmask"`` the
   teacher also runs on every *student* view and its last-layer [CLS]->patch attention (mean over
   heads, Eq. 2) ranks the patches; this is computed under ``no_grad`` on the same view the
   student will see (global views in one pass of 2B images, the locals in one pass of
   ``n_local * B``). Option ``rank_source="image"``: the attention instead comes from the
   teacher on the whole images (resized to ``global_size``, in the teacher view's pass),
   resampled onto each student view's crop box (:func:`~apmask_lib.pretrain.masking.attention_on_boxes`).
3. **Masking** (:func:`~apmask_lib.pretrain.masking.keep_indices`): the ``ceil(r * N)`` least-attended
   patch tokens of each student view are removed from its sequence (``keep_idx``), so the
   student really processes fewer tokens; ``random``/``block``/``none`` are the ablations.
4. **Student**: one forward for the B global views, one for the ``n_local * B`` local views
   (same size, batched), shared projection + prototypes. **View pairing**: every student view
   of image b (global and locals) predicts the codes of image b's teacher view; the loss is
   the cross-entropy of Eq. 1 averaged over the 1 + n_local views and the batch
   (:func:`~apmask_lib.pretrain.sinkhorn.swapped_prediction_loss`).
5. AdamW step (LR warm-up then cosine, weight decay cosine 0.04 -> 0.4 as DINO, none on biases,
   norms, position embedding, [CLS] token and prototypes; gradient clipping), prototypes
   re-normalised, teacher EMA with momentum cosine 0.996 -> 1.

Engineering: bf16 autocast and fused AdamW on CUDA; ``pretrain.compile`` compiles each ViT block
(:mod:`apmask_lib.core.fastpath`; CUDA graphs with ``reduce-overhead``); no host sync inside a step (losses stay on
the device and are read every ``log_every`` steps); checkpoint every epoch (atomic) and exact
resume; the augmentation generator is re-seeded at every step from (seed, rank, step), so the
schedule position *is* the random state; DDP under ``torchrun`` (``pretrain.batch_size`` is the
global batch, split across ranks; only rank 0 writes files). Outputs in
``<out_dir>/pretrain``: checkpoint.pt, backbone.pt (EMA-teacher backbone state dict, loadable with
``build_backbone("file:...")``), log.csv (per step), log.jsonl (per epoch), config.json, and done.json
written last where the run stops (:mod:`apmask_lib.training.runfolder`: lock, done marker, no overwriting
without ``force``; the steps of a run: :mod:`apmask_lib.training.stage` (:class:`PretrainStage` says
what pre-training adds), the loop, logs and progress lines: :mod:`apmask_lib.training.loop`, all shared with
fine-tuning). The network is :class:`~apmask_lib.models.swav.SwAVNet`; the teacher pass and token
selection of steps 2-3 are :func:`~apmask_lib.pretrain.masking.student_views`.
"""
from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .collapse import STAT_COLUMNS, assignment_stats
from ..config import Config
from ..data.types import cap_train
from ..core.fastpath import compile_blocks
from .masking import student_views
from ..models.swav import SwAVHead, SwAVNet
from .multicrop import ImageBank, MultiCrop, cache_short_side, load_image_bank
from ..training.runfolder import RunFolder, resume_ignored
from .sinkhorn import push_queue, sinkhorn, sinkhorn_with_queue, swapped_prediction_loss
from ..training.loop import TrainLoop
from ..training.stage import Stage
from ..core.devices import accelerated, autocast_context, resolve_device
from ..core.files import atomic_torch_save
from ..core.optim import cosine_scheduler, ema_update, optimizer_step, param_groups, set_lr
from ..core.rng import seed_everything
from ..weights import build_backbone

CSV_COLUMNS = ("step", "epoch", "loss", "lr", "wd", "momentum", "step_time", "images_per_s") + STAT_COLUMNS
# config keys that do not change the trained weights (may differ on resume); pre-training never reads finetune.*
_RESUME_IGNORED = resume_ignored("pretrain", whole=("finetune",))


# ----------------------------------------------------------------------------- model
def build_student(cfg: Config) -> SwAVNet:
    """Backbone from ``cfg.backbone`` (seeded by ``cfg.seed`` where random) + a fresh head:
    ``ProjectionMLP(C, pretrain.hidden_dim, pretrain.out_dim, l2=True, norm=pretrain.head_norm)`` and
    ``Prototypes(pretrain.out_dim, pretrain.n_prototypes)``. (``pretrain.bottleneck_dim`` is not
    used here: fine-tuning reads it for its detection MLP, which ``head_norm`` does not change.)"""
    p = cfg.pretrain
    backbone = build_backbone(cfg.backbone, seed=cfg.seed)
    return SwAVNet(backbone, SwAVHead(backbone.embed_dim, p.hidden_dim, p.out_dim, p.n_prototypes,
                                      norm=p.head_norm))


# ----------------------------------------------------------------------------- one step
def pretrain_loss(student: nn.Module, teacher: SwAVNet, views, cfg_p, generator: torch.Generator,
                  stats: Optional[dict] = None) -> torch.Tensor:
    """Eq. 1 for one batch of views (teacher pass, APMask, student pass, Sinkhorn, CE). ``stats``: a
    dict to fill with the collapse diagnostics of :func:`~apmask_lib.pretrain.collapse.assignment_stats`.

    ``pretrain.queue_length`` L > 0: SwAV's queue (:func:`~apmask_lib.pretrain.sinkhorn.sinkhorn_with_queue`): the
    teacher's projection output of this batch is captured (forward hook on ``teacher.head.projection``),
    the last L of them (attribute ``teacher.sinkhorn_queue``, not in the state dict, so not checkpointed)
    are scored with the teacher's current prototypes and balanced with the batch; then the batch is pushed."""
    length = getattr(cfg_p, "queue_length", 0)
    captured: list[torch.Tensor] = []
    hook = teacher.head.projection.register_forward_hook(lambda m, i, o: captured.append(o)) if length else None
    try:
        t_scores, groups = student_views(teacher, views, cfg_p.mask, cfg_p.mask_ratio, generator,
                                         getattr(cfg_p, "rank_source", "view"))
    finally:
        if hook is not None:
            hook.remove()
    s_scores = student(groups)
    if length:
        with torch.no_grad():
            queue = getattr(teacher, "sinkhorn_queue", None)
            q_scores = None if queue is None else teacher.head.prototypes(queue.to(captured[-1].dtype))
            q = sinkhorn_with_queue(t_scores, q_scores, eps=cfg_p.sinkhorn_eps, iters=cfg_p.sinkhorn_iters)
            teacher.sinkhorn_queue = push_queue(queue, captured[-1][:t_scores.shape[0]], length)
    else:
        q = sinkhorn(t_scores, eps=cfg_p.sinkhorn_eps, iters=cfg_p.sinkhorn_iters)
    codes = q / q.sum(dim=1, keepdim=True)  # = Q * B_global: per-sample code distributions
    if stats is not None:
        stats.update(assignment_stats(t_scores, codes, s_scores, cfg_p.temperature))
    return swapped_prediction_loss(codes, s_scores, cfg_p.temperature)


def train_step(model: nn.Module, teacher: SwAVNet, optimizer: torch.optim.Optimizer, views, p,
               generator: torch.Generator, momentum: float, autocast=None,
               freeze_prototypes: bool = False, stats: Optional[dict] = None) -> torch.Tensor:
    """One optimisation step (module docstring, steps 2-5): loss under ``autocast``, backward,
    gradient clipping (``p.clip_grad``), AdamW, prototype re-normalisation, teacher EMA with
    ``momentum``. ``model`` is the student or its DDP wrapper; ``freeze_prototypes`` drops the
    prototypes' gradient and skips their re-normalisation, so they do not move at all (SwAV's
    ``freeze_prototypes_niters``; :meth:`PretrainStage.step` sets it for the first ``pretrain.freeze_prototypes_iters``
    steps; the teacher's copy then stays equal to them through the EMA). Returns the detached loss, still on the device."""
    student = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with autocast or contextlib.nullcontext():
        loss = pretrain_loss(model, teacher, views, p, generator, stats)
    # frozen prototypes: their gradient is dropped, and AdamW skips a parameter without gradient
    optimizer_step(optimizer, loss, student, p.clip_grad, frozen=(student.head.prototypes.weight,) if freeze_prototypes else ())
    if not freeze_prototypes:  # frozen prototypes stay bit-identical (already unit norm)
        student.head.prototypes.normalize_()
    ema_update(teacher, student, momentum)
    return loss.detach()


# ----------------------------------------------------------------------------- helpers
def _dist_setup(cfg: Config) -> tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, we_initialised). Initialises a process group only when
    launched by torchrun with WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, resolve_device(cfg.device), False
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available() and cfg.device != "cpu":
        local = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device, created


def _step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """Augmentation/masking randomness of one step on one rank: a pure function of
    (seed, rank, step), which makes resume exact without storing generator state."""
    s = int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(s)


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The image permutation of an epoch, identical on all ranks."""
    s = int(np.random.SeedSequence([seed, 7919, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(s))


def peak_lr(p, global_batch: int) -> float:
    """The peak learning rate the optimiser gets. ``pretrain.lr_scaling`` "absolute": ``pretrain.lr`` as
    written; "linear": DINO's rule ``lr · global_batch / 256`` (``main_dino.py`` reads ``--lr`` "for a
    reference batch size of 256"; global_batch = images per step over all processes), e.g. 5e-4 at batch
    16 gives 3.125e-5. The warm-up start and the cosine floor stay as written (as in DINO)."""
    if p.lr_scaling == "linear":
        return p.lr * global_batch / 256.0
    return p.lr


def schedules(p, iters_per_epoch: int, global_batch: int = 256) -> dict[str, np.ndarray]:
    """Per-iteration lr (peak :func:`peak_lr`), weight decay and teacher momentum (DINO's schedules)."""
    return {
        "lr": cosine_scheduler(peak_lr(p, global_batch), p.min_lr, p.epochs, iters_per_epoch, p.warmup_epochs,
                               p.start_lr),
        "wd": cosine_scheduler(p.weight_decay, p.weight_decay_end, p.epochs, iters_per_epoch),
        "momentum": cosine_scheduler(p.momentum_teacher, 1.0, p.epochs, iters_per_epoch),
    }


@dataclass
class PretrainState:
    """What a pre-training run trains (:func:`build_pretrain_state`): the cached image bank and its
    views, batch sizes, schedules, the student, its EMA teacher and the optimiser."""

    bank: ImageBank
    crops: MultiCrop
    global_batch: int       # images per step, all processes together
    per_rank: int           # images per step and process
    iters: int              # steps per epoch
    total: int              # steps of the whole schedule
    schedules: dict[str, np.ndarray]
    student: SwAVNet
    teacher: SwAVNet
    optimizer: torch.optim.Optimizer

    @property
    def n(self) -> int:
        return len(self.bank)


def build_pretrain_state(cfg: Config, dataset=None, device: torch.device | str = "cpu", world: int = 1,
                         progress: bool = False, bank: Optional[ImageBank] = None) -> PretrainState:
    """Data, schedules and models of a pre-training run, before any checkpoint is loaded: the
    ``data.max_train``-capped training split decoded once into an :class:`ImageBank` (or ``bank``,
    reused), the global batch (``pretrain.batch_size``, at most the number of images, a multiple of
    ``world``), DINO's schedules, the student seeded by ``cfg.seed``, its teacher copy (no
    gradients) and AdamW (fused where :func:`~apmask_lib.core.devices.accelerated`)."""
    p = cfg.pretrain
    device = torch.device(device)
    if bank is None:
        if dataset is None:
            from ..data import dataset_from_config

            dataset = dataset_from_config(cfg.data)
        train = cap_train(dataset.train, cfg.data.max_train)
        if not train:
            raise ValueError(f"no training images in {getattr(dataset, 'name', 'the dataset')} (data.max_train="
                             f"{cfg.data.max_train})")
        bank = load_image_bank(dataset, train, cache_short_side(p.global_size), p.num_workers,
                               progress=progress).to(device)
    n = len(bank)
    gb = min(p.batch_size, n)
    gb -= gb % world
    if gb == 0:
        raise ValueError(f"{n} training image(s) cannot be split across {world} processes")
    iters = n // gb  # drop_last when n >= batch_size; one smaller batch otherwise
    sched = schedules(p, iters, gb)
    crops = MultiCrop.from_config(p)

    seed_everything(cfg.seed)  # same init on every rank
    student = build_student(cfg).to(device)
    teacher = copy.deepcopy(student).eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    fused = accelerated(device)  # fused AdamW (CUDA; on the CPU only through the test seam)
    optimizer = torch.optim.AdamW(param_groups(student), lr=p.lr, fused=fused) if fused else \
        torch.optim.AdamW(param_groups(student), lr=p.lr)
    return PretrainState(bank, crops, gb, gb // world, iters, p.epochs * iters, sched, student, teacher, optimizer)


# ----------------------------------------------------------------------------- the run
def run_pretrain(cfg: Config, dataset=None, max_steps: Optional[int] = None, resume: bool = True,
                 progress: bool = True, force: bool = False) -> Path:
    """Pre-train with APMask; returns ``Path(cfg.out_dir) / "pretrain"`` (files: module docstring).

    dataset:   an :class:`~apmask_lib.data.AnomalyDataset` (its ``train`` split is used, capped at
               ``cfg.data.max_train``); None builds it from ``cfg.data``.
    max_steps: stop once the *global* step reaches this (smoke runs, tests). The schedules stay
               those of the full ``pretrain.epochs`` run, so a capped run is an exact prefix of
               it, and calling again with a larger ``max_steps`` (or None) continues it.
    resume:    continue from ``checkpoint.pt`` when present (a finished run returns at once, after
               checking ``done.json``); False starts afresh -- refused, like a missing checkpoint,
               where the folder holds finished outputs, unless ``force``.
    force:     discard what the folder holds (checkpoint, backbone.pt, logs) and train from scratch.
    progress:  a bar on a terminal, one line per epoch elsewhere (:mod:`apmask_lib.training.loop`).
    A second run in the same folder is refused (:class:`~apmask_lib.training.runfolder.RunLocked`).
    """
    rank, world, device, created_pg = _dist_setup(cfg)
    run = RunFolder(cfg.out_dir, "pretrain", ("backbone.pt",), _RESUME_IGNORED, main=rank == 0)
    try:
        with run.locked():
            return PretrainStage(cfg, run, rank, world, device).train(dataset, max_steps, resume and not force, force,
                                                                      progress)
    finally:
        if created_pg:
            dist.destroy_process_group()


def _mean_over_ranks(world: int):
    def reduce(vals: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(vals)
        return vals / world
    return reduce if world > 1 else None


class PretrainStage(Stage):
    """Pre-training in the shared training shell (:class:`~apmask_lib.training.stage.Stage`): the
    state of :func:`build_pretrain_state`, one :func:`train_step` a step on the step's views, the EMA
    teacher's backbone exported at every save. ``rank``/``world``/``device``: of this process (DDP)."""

    csv_columns = CSV_COLUMNS
    keys = ("loss",) + STAT_COLUMNS
    what = "pre-training loss"
    export_every_save = True

    def __init__(self, cfg: Config, run: RunFolder, rank: int, world: int, device: torch.device):
        super().__init__(cfg, run)
        self.rank, self.world, self.device = rank, world, device
        self._perm: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def build(self, dataset, ckpt: Optional[dict], show_progress: bool) -> None:
        if ckpt is not None and ckpt["world_size"] != self.world:
            warnings.warn(f"{self.run.checkpoint} was written with world size {ckpt['world_size']}, resuming with "
                          f"{self.world}: the augmentation streams differ from an uninterrupted run", stacklevel=4)
        self.st = build_pretrain_state(self.cfg, dataset, self.device, self.world, progress=show_progress)
        self.iters, self.total, self.log_every = self.st.iters, self.st.total, self.cfg.pretrain.log_every

    def restore(self, ckpt: dict) -> dict:
        self.st.student.load_state_dict(ckpt["student"])
        self.st.teacher.load_state_dict(ckpt["teacher"])
        self.st.optimizer.load_state_dict(ckpt["optimizer"])
        return {"loss": ckpt["epoch_losses"]}

    def prepare(self) -> None:
        # compile after the teacher copy and the checkpoint load: in place, state-dict keys unchanged
        st, device = self.st, self.device
        compile_blocks(st.student.backbone, self.cfg.pretrain.compile)
        compile_blocks(st.teacher.backbone, self.cfg.pretrain.compile)
        self.model = st.student
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                st.student, device_ids=[device.index] if device.type == "cuda" else None)
        self.autocast = autocast_context(device)

    def run_info(self) -> dict:
        st, p = self.st, self.cfg.pretrain
        return {"n_train": st.n, "global_batch": st.global_batch, "world_size": self.world, "iters_per_epoch": st.iters,
                "total_steps": st.total, "device": str(self.device), "cached_short_side": cache_short_side(p.global_size),
                "teacher_view": p.teacher_view, "backbone_source": self.cfg.backbone}

    def reduce(self):
        return _mean_over_ranks(self.world)

    def _batch(self, step: int) -> torch.Tensor:
        """This rank's image indices of ``step`` (the epoch's permutation, shared by all ranks)."""
        st, (epoch, it) = self.st, divmod(step, self.st.iters)
        if self._perm[0] != epoch:
            self._perm = (epoch, _epoch_order(self.cfg.seed, epoch, st.n))
        gb = st.global_batch
        return self._perm[1][it * gb:(it + 1) * gb][self.rank * st.per_rank:(self.rank + 1) * st.per_rank]

    def step(self, step: int, item) -> tuple[dict, int, dict]:
        st, p = self.st, self.cfg.pretrain
        idx = self._batch(step)
        lr, wd, mom = (float(st.schedules[k][step]) for k in ("lr", "wd", "momentum"))
        set_lr(st.optimizer, lr)
        st.optimizer.param_groups[0]["weight_decay"] = wd
        gen = _step_generator(self.cfg.seed, self.rank, step)
        views = st.crops(st.bank.images[idx.to(self.device, non_blocking=True)], st.bank.sizes[idx], gen)
        stats: dict[str, torch.Tensor] = {}
        loss = train_step(self.model, st.teacher, st.optimizer, views, p, gen, mom, self.autocast,
                          freeze_prototypes=step < p.freeze_prototypes_iters, stats=stats)
        return {"loss": loss, **stats}, st.global_batch, {"lr": lr, "wd": wd, "momentum": mom}

    def state(self) -> tuple[dict, dict]:
        st = self.st
        return ({"student": st.student, "teacher": st.teacher, "optimizer": st.optimizer},
                {"epoch_losses": list(self.loop.means["loss"]), "world_size": self.world})

    def epoch_record(self, loop: TrainLoop, epoch: int, step: int, secs: float) -> dict:
        r = loop.last
        return {"epoch": epoch, "step": step, **loop.epoch_means(), "lr": r["lr"], "wd": r["wd"],
                "momentum": r["momentum"], "time_s": secs,
                "images_per_s": loop.epoch_steps * self.st.global_batch / max(secs, 1e-9)}

    def export(self, step: int) -> None:
        """backbone.pt: the EMA teacher's backbone (every save, so it follows the checkpoint)."""
        if self.run.main:
            atomic_torch_save(self.run / "backbone.pt", self.st.teacher.backbone.state_dict())

    def finish(self) -> None:
        if self.world > 1:
            dist.barrier()


__all__ = ["build_student", "param_groups", "ema_update", "peak_lr", "schedules",
           "pretrain_loss", "train_step", "schedules", "PretrainState", "build_pretrain_state", "PretrainStage", "run_pretrain",
           "CSV_COLUMNS"]
