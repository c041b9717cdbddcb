"""APMask pre-training (paper Sec. 3.1, Eq. 1-4): SwAV with an EMA teacher, multi-crop, and
attention-guided token dropping in the student.

One step, for a batch of B images (all sizes from :class:`~apmask_lib.config.PretrainConfig`):

1. **Views** (:mod:`apmask_lib.multicrop`): an unmasked global view for the teacher, one global
   and ``n_local`` local views for the student (``teacher_view`` says whether the teacher's view
   is a second global crop, the default as in DINO/SwAV, or the student's own global crop).
2. **Teacher** (EMA of the student: backbone + projection + prototypes, no gradient): its
   prototype scores on the teacher view become codes by Sinkhorn-Knopp over the batch
   (:func:`~apmask_lib.sinkhorn.sinkhorn`, all ranks together). For ``mask="apmask"`` the
   teacher also runs on every *student* view and its last-layer [CLS]->patch attention (mean over
   heads, Eq. 2) ranks the patches; this is computed under ``no_grad`` on the same view the
   student will see (global views in one pass of 2B images, the locals in one pass of
   ``n_local * B``). Option ``rank_source="image"``: the attention instead comes from the
   teacher on the whole images (resized to ``global_size``, in the teacher view's pass),
   resampled onto each student view's crop box (:func:`~apmask_lib.masking.attention_on_boxes`).
3. **Masking** (:func:`~apmask_lib.masking.keep_indices`): the ``ceil(r * N)`` least-attended
   patch tokens of each student view are removed from its sequence (``keep_idx``), so the
   student really processes fewer tokens; ``random``/``block``/``none`` are the ablations.
4. **Student**: one forward for the B global views, one for the ``n_local * B`` local views
   (same size, batched), shared projection + prototypes. **View pairing**: every student view
   of image b (global and locals) predicts the codes of image b's teacher view; the loss is
   the cross-entropy of Eq. 1 averaged over the 1 + n_local views and the batch
   (:func:`~apmask_lib.sinkhorn.swapped_prediction_loss`).
5. AdamW step (LR warm-up then cosine, weight decay cosine 0.04 -> 0.4 as DINO, none on biases,
   norms, position embedding, [CLS] token and prototypes; gradient clipping), prototypes
   re-normalised, teacher EMA with momentum cosine 0.996 -> 1.

Engineering: bf16 autocast and fused AdamW on CUDA; ``pretrain.compile`` compiles each ViT block
(:mod:`apmask_lib.fastpath`; CUDA graphs with ``reduce-overhead``); no host sync inside a step (losses stay on
the device and are read every ``log_every`` steps); checkpoint every epoch (atomic) and exact
resume; the augmentation generator is re-seeded at every step from (seed, rank, step), so the
schedule position *is* the random state; DDP under ``torchrun`` (``pretrain.batch_size`` is the
global batch, split across ranks; only rank 0 writes files). Outputs in
``<out_dir>/pretrain``: checkpoint.pt, backbone.pt (EMA-teacher backbone state dict, loadable with
``build_backbone("file:...")``), log.csv (per step), log.jsonl (per epoch), config.json, and done.json
written last where the run stops (:mod:`apmask_lib.runfolder`: lock, done marker, no overwriting
without ``force``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .collapse import STAT_COLUMNS, assignment_stats
from .config import RANK_SOURCES, Config
from .fastpath import compile_blocks
from .masking import attention_on_boxes, keep_indices, num_dropped
from .models import VisionTransformer
from .weights import build_backbone
from .models.heads import ProjectionMLP, Prototypes
from .multicrop import ImageBank, MultiCrop, cache_short_side, load_image_bank
from . import runfolder
from .sinkhorn import push_queue, sinkhorn, sinkhorn_with_queue, swapped_prediction_loss
from .devices import accelerated, autocast_context, resolve_device
from .files import append_jsonl, atomic_torch_save, CSVLog, save_checkpoint, truncate_jsonl, write_json
from .fingerprint import config_fingerprint, load_resume_checkpoint
from .nonfinite import check_finite
from .optim import cosine_scheduler, param_groups
from .rng import rng_state, seed_everything, set_rng_state

CSV_COLUMNS = ("step", "epoch", "loss", "lr", "wd", "momentum", "step_time", "images_per_s") + STAT_COLUMNS
# config keys that do not change the trained weights (may differ on resume)
_RESUME_IGNORED = {("pretrain", "num_workers"), ("pretrain", "log_every"), ("pretrain", "compile"), ("device",), ("out_dir",),
                   ("finetune",), ("evaluate",), ("data", "max_test")}


# ----------------------------------------------------------------------------- model
class SwAVHead(nn.Module):
    """Projection MLP (l2 output) followed by the K prototypes: feature (.., C) -> scores z·Cᵀ (.., K)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, n_prototypes: int, nlayers: int = 3):
        super().__init__()
        self.projection = ProjectionMLP(in_dim, hidden_dim, out_dim, nlayers=nlayers, l2=True)
        self.prototypes = Prototypes(out_dim, n_prototypes)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.projection(feats))


class SwAVNet(nn.Module):
    """Backbone + :class:`SwAVHead` (the student; the teacher is a copy). ``forward`` takes a
    list of ``(images, keep_idx or None)`` view groups (one per crop size, DINO's
    ``MultiCropWrapper``) and returns their prototype scores, one (B_i, K) tensor per group.
    The head runs once on the concatenated [CLS] features. Key names are ``backbone.*`` and
    ``head.*``, so ``build_backbone("file:checkpoint.pt")`` finds the teacher's backbone."""

    def __init__(self, backbone: VisionTransformer, head: SwAVHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, views: Sequence[tuple[torch.Tensor, Optional[torch.Tensor]]]) -> list[torch.Tensor]:
        feats = [self.backbone(x, keep_idx=k, attn=None).cls for x, k in views]
        scores = self.head(torch.cat(feats))
        return list(scores.split([f.shape[0] for f in feats]))


def build_student(cfg: Config) -> SwAVNet:
    """Backbone from ``cfg.backbone`` (seeded by ``cfg.seed`` where random) + a fresh head:
    ``ProjectionMLP(C, pretrain.hidden_dim, pretrain.out_dim, l2=True)`` and
    ``Prototypes(pretrain.out_dim, pretrain.n_prototypes)``. (``pretrain.bottleneck_dim`` is not
    used here: fine-tuning reads it for its detection MLP.)"""
    p = cfg.pretrain
    backbone = build_backbone(cfg.backbone, seed=cfg.seed)
    return SwAVNet(backbone, SwAVHead(backbone.embed_dim, p.hidden_dim, p.out_dim, p.n_prototypes))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, all parameters (backbone and head)."""
    t = [p for p in teacher.parameters()]
    s = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t, s, 1.0 - momentum)


# ----------------------------------------------------------------------------- one step
def _keep(scores: Optional[torch.Tensor], n_views: int, grid: tuple[int, int], kind: str, ratio: float,
          generator: torch.Generator, device: torch.device) -> Optional[torch.Tensor]:
    n = grid[0] * grid[1]
    if kind == "none" or num_dropped(n, ratio) == 0:
        return None
    if scores is None:  # random / block only need the shape
        scores = torch.zeros(n_views, n, device=device)
    return keep_indices(scores, ratio, kind, generator, grid)


def _grid_boxes(boxes: torch.Tensor, flip: Optional[torch.Tensor], view_hw: Sequence[int], grid: tuple[int, int],
                patch: int) -> torch.Tensor:
    """The part of each crop box (x1, y1, x2, y2, image pixels) a view's patch grid covers: the
    patch embedding drops the last ``view % patch`` rows/columns of the view (of the mirrored
    crop where ``flip``, i.e. its left side). The whole box when the view size is a multiple
    of the patch size."""
    fy, fx = grid[0] * patch / view_hw[0], grid[1] * patch / view_hw[1]
    if fx == 1.0 and fy == 1.0:
        return boxes
    x1, y1, x2, y2 = boxes.unbind(1)
    cw, ch = (x2 - x1) * fx, (y2 - y1) * fy
    left = x1 if flip is None else torch.where(flip.to(boxes.device), x2 - cw, x1)
    return torch.stack([left, y1, left + cw, y1 + ch], dim=1)


def _image_rank_scores(att: torch.Tensor, bb, views, size: int, boxes: torch.Tensor, flip: Optional[torch.Tensor],
                       view_hw: Sequence[int]) -> torch.Tensor:
    """Scores (M, N) for the views with crop ``boxes``, from the teacher's (B, h*w) attention
    ``att`` on the whole images resized to ``size`` (:func:`~apmask_lib.masking.attention_on_boxes`)."""
    if boxes is None or views.sizes is None:
        raise ValueError("pretrain.rank_source='image' needs the views' crop boxes and image sizes "
                         "(MultiCropViews from MultiCrop)")
    B = att.shape[0]
    h, w = bb.grid_size(size, size)
    sizes = views.sizes.to(att.device, non_blocking=True).float()
    span = torch.stack([sizes[:, 0] * (h * bb.patch_size / size), sizes[:, 1] * (w * bb.patch_size / size)], dim=1)
    grid = bb.grid_size(*view_hw)
    index = torch.arange(B, device=att.device).repeat(boxes.shape[0] // B)
    return attention_on_boxes(att.reshape(B, h, w), span, _grid_boxes(boxes, flip, view_hw, grid, bb.patch_size),
                              index, flip, grid)


def student_views(teacher: SwAVNet, views, mask: str, ratio: float, generator: torch.Generator,
                  rank_source: str = "view"):
    """Teacher pass (no grad) and token selection. Returns (teacher scores (B, K),
    [(student global, keep_idx), (locals, keep_idx)]) -- the keep_idx come from the teacher's
    last-layer [CLS] attention for ``mask="apmask"``: on the student views themselves
    (``rank_source="view"``), or on the whole images, resampled onto each view's crop box
    (``rank_source="image"``; with ``teacher_view="same"`` the student global view still uses
    the teacher pass's own attention, which costs nothing)."""
    if rank_source not in RANK_SOURCES:
        raise ValueError(f"rank_source must be one of {RANK_SOURCES}, got {rank_source!r}")
    bb = teacher.backbone
    B = views.teacher.shape[0]
    need_attn = mask == "apmask"
    same = views.student_global is views.teacher
    with torch.no_grad():
        if need_attn and rank_source == "image":
            t_scores, g_attn, l_attn = _whole_image_pass(teacher, views, same)
        else:
            if same or not need_attn:
                out = bb(views.teacher, attn="cls" if (need_attn and same) else None)
                t_scores = teacher.head(out.cls)
                g_attn = out.cls_attention() if (need_attn and same) else None
            else:
                out = bb(torch.cat([views.teacher, views.student_global]), attn="cls")
                t_scores = teacher.head(out.cls[:B])
                g_attn = out.cls_attention()[B:]
            l_attn = None
            if need_attn and views.local.shape[0]:
                l_attn = bb(views.local, attn="cls").cls_attention()
    dev = views.teacher.device
    g_grid = bb.grid_size(*views.student_global.shape[-2:])
    groups = [(views.student_global, _keep(g_attn, B, g_grid, mask, ratio, generator, dev))]
    if views.local.shape[0]:
        l_grid = bb.grid_size(*views.local.shape[-2:])
        groups.append((views.local, _keep(l_attn, views.local.shape[0], l_grid, mask, ratio, generator, dev)))
    return t_scores, groups


def _whole_image_pass(teacher: SwAVNet, views, same: bool):
    """The teacher pass of :func:`student_views` for ``rank_source="image"`` (under its no_grad):
    ONE forward of the teacher views and the whole images (both at the global size, 2B images; B
    when ``same`` and no locals). Returns (teacher scores (B, K), student-global ranking scores,
    local ranking scores or None)."""
    bb = teacher.backbone
    B = views.teacher.shape[0]
    G = views.teacher.shape[-1]
    n_loc = views.local.shape[0]
    whole = views.whole_image(G) if (not same or n_loc) else None
    out = bb(views.teacher if whole is None else torch.cat([views.teacher, whole]), attn="cls")
    t_scores = teacher.head(out.cls[:B])
    att = out.cls_attention()
    g_attn = att[:B] if same else _image_rank_scores(att[B:], bb, views, G, views.student_global_boxes,
                                                     views.student_global_flip, views.student_global.shape[-2:])
    l_attn = _image_rank_scores(att[B:], bb, views, G, views.local_boxes, views.local_flip,
                                views.local.shape[-2:]) if n_loc else None
    return t_scores, g_attn, l_attn


def pretrain_loss(student: nn.Module, teacher: SwAVNet, views, cfg_p, generator: torch.Generator,
                  stats: Optional[dict] = None) -> torch.Tensor:
    """Eq. 1 for one batch of views (teacher pass, APMask, student pass, Sinkhorn, CE). ``stats``: a
    dict to fill with the collapse diagnostics of :func:`~apmask_lib.collapse.assignment_stats`.

    ``pretrain.queue_length`` L > 0: SwAV's queue (:func:`~apmask_lib.sinkhorn.sinkhorn_with_queue`): the
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
    prototypes' gradient (SwAV's first iterations). Returns the detached loss, still on the device."""
    student = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    with autocast if autocast is not None else contextlib.nullcontext():
        loss = pretrain_loss(model, teacher, views, p, generator, stats)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if p.clip_grad and p.clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(student.parameters(), p.clip_grad)
    if freeze_prototypes:
        student.head.prototypes.weight.grad = None
    optimizer.step()
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


def schedules(p, iters_per_epoch: int) -> dict[str, np.ndarray]:
    """Per-iteration lr, weight decay and teacher momentum (DINO's schedules)."""
    return {
        "lr": cosine_scheduler(p.lr, p.min_lr, p.epochs, iters_per_epoch, p.warmup_epochs, p.start_lr),
        "wd": cosine_scheduler(p.weight_decay, p.weight_decay_end, p.epochs, iters_per_epoch),
        "momentum": cosine_scheduler(p.momentum_teacher, 1.0, p.epochs, iters_per_epoch),
    }


def _train_images(cfg: Config, dataset) -> tuple[Any, list]:
    if dataset is None:
        from .data import dataset_from_config

        dataset = dataset_from_config(cfg.data)
    train = list(dataset.train)
    if cfg.data.max_train is not None:
        train = train[: cfg.data.max_train]
    if not train:
        raise ValueError(f"no training images in {getattr(dataset, 'name', 'the dataset')} (data.max_train="
                         f"{cfg.data.max_train})")
    return dataset, train


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
    A second run in the same folder is refused (:class:`~apmask_lib.runfolder.RunLocked`).
    """
    p = cfg.pretrain
    out = Path(cfg.out_dir) / "pretrain"
    ckpt_path, backbone_path = out / "checkpoint.pt", out / "backbone.pt"
    rank, world, device, created_pg = _dist_setup(cfg)
    try:
        with runfolder.RunLock(out) if rank == 0 else contextlib.nullcontext():
            if rank == 0:
                runfolder.sweep_temporaries(out)
            return _run(cfg, dataset, max_steps, resume and not force, progress, out, ckpt_path, backbone_path, rank,
                        world, device, force)
    finally:
        if created_pg:
            dist.destroy_process_group()


_OUTPUTS = ("checkpoint.pt", "backbone.pt")  # the files done.json vouches for


def _run(cfg, dataset, max_steps, resume, progress, out, ckpt_path, backbone_path, rank, world, device,
         force=False) -> Path:
    p = cfg.pretrain
    main = rank == 0
    fingerprint = config_fingerprint(cfg, _RESUME_IGNORED)

    ckpt = None
    if resume and ckpt_path.is_file():
        ckpt = load_resume_checkpoint(ckpt_path, fingerprint)
        if runfolder.finished(runfolder.read_marker(out, _OUTPUTS), max_steps):
            return out
        # not finished, or its exports do not match done.json (e.g. killed between the checkpoint and the
        # export): go on from the checkpoint; when it already covers this call, no step runs and the
        # exports are re-derived from it below
        if ckpt["world_size"] != world:
            warnings.warn(f"{ckpt_path} was written with world size {ckpt['world_size']}, resuming with {world}: "
                          "the augmentation streams differ from an uninterrupted run", stacklevel=2)
    elif main:
        runfolder.guard(out, ("backbone.pt",), force)
    if main:
        runfolder.clear_marker(out)  # before anything in the folder changes

    # ---- data
    dataset, train = _train_images(cfg, dataset)
    bank: ImageBank = load_image_bank(dataset, train, cache_short_side(p.global_size), p.num_workers,
                                      progress=progress and main).to(device)
    n = len(bank)
    gb = min(p.batch_size, n)
    gb -= gb % world
    if gb == 0:
        raise ValueError(f"{n} training image(s) cannot be split across {world} processes")
    per_rank = gb // world
    iters = n // gb  # drop_last when n >= batch_size; one smaller batch otherwise
    total = p.epochs * iters
    stop = total if max_steps is None else min(total, max_steps)
    sched = schedules(p, iters)
    crops = MultiCrop.from_config(p)

    # ---- models (seeded: same init on every rank)
    seed_everything(cfg.seed)
    student = build_student(cfg).to(device)
    teacher = copy.deepcopy(student).eval()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    fused = accelerated(device)  # fused AdamW (CUDA; on the CPU only through the test seam)
    optimizer = torch.optim.AdamW(param_groups(student), lr=p.lr, fused=fused) if fused else \
        torch.optim.AdamW(param_groups(student), lr=p.lr)
    start, epoch_losses = 0, []
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start, epoch_losses = int(ckpt["step"]), list(ckpt["epoch_losses"])
        if ckpt["iters_per_epoch"] != iters:
            raise ValueError(f"{ckpt_path}: {ckpt['iters_per_epoch']} iterations per epoch, now {iters} "
                             "(training set or batch size changed); use another out_dir")
    # compile after the teacher copy and the checkpoint load: in place, state-dict keys unchanged
    compile_blocks(student.backbone, p.compile)
    compile_blocks(teacher.backbone, p.compile)
    model = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = autocast_context(device)

    # ---- files
    csv = CSVLog(out / "log.csv", CSV_COLUMNS)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            for f in (out / "log.csv", out / "log.jsonl"):
                f.unlink(missing_ok=True)
        else:
            csv.truncate_after(start)
            truncate_jsonl(out / "log.jsonl", start // iters)
        write_json(out / "config.json", {**cfg.to_dict(), "_run": {
            "n_train": n, "global_batch": gb, "world_size": world, "iters_per_epoch": iters, "total_steps": total,
            "device": str(device), "cached_short_side": cache_short_side(p.global_size),
            "teacher_view": p.teacher_view, "backbone_source": cfg.backbone}})

    def export() -> None:
        """backbone.pt: the EMA teacher's backbone (every save, so it follows the checkpoint)."""
        atomic_torch_save(backbone_path, teacher.backbone.state_dict())

    def mark(step: int) -> None:
        """done.json, last: where this call stops, vouching for the checkpoint and backbone.pt."""
        runfolder.write_marker(out, _OUTPUTS, stage="pretrain", step=step, total_steps=total, done=step >= total)

    def save(step: int, done: bool) -> None:
        if not main:
            return
        save_checkpoint(ckpt_path, student=student, teacher=teacher, optimizer=optimizer, step=step,
                        iters_per_epoch=iters, done=done, config=json.dumps(fingerprint), rng=rng_state(),
                        epoch_losses=list(epoch_losses), world_size=world)
        export()
        if step == stop:
            mark(step)

    pending: list[dict[str, Any]] = []
    bar = tqdm(total=stop, initial=start, desc="pretrain", disable=not (progress and main), dynamic_ncols=True)

    def flush() -> None:
        if not pending:
            return
        keys = ("loss",) + STAT_COLUMNS
        vals = torch.stack([torch.stack([r[k].float() for k in keys]) for r in pending])
        if world > 1:
            dist.all_reduce(vals)
            vals = vals / world
        for r, v in zip(pending, vals.cpu().tolist()):
            check_finite(v[0], "pre-training loss", r["step"], checkpoint=ckpt_path)
            r.update(zip(keys, v))
            epoch_losses.append(v[0])
            for k, x in zip(STAT_COLUMNS, v[1:]):
                epoch_stats.setdefault(k, []).append(x)
            if main:
                csv.write(r)
        bar.set_postfix(loss=f"{pending[-1]['loss']:.4f}")
        pending.clear()

    perm, perm_epoch = None, -1
    epoch_stats: dict[str, list[float]] = {}  # collapse diagnostics (apmask_lib/collapse.py), per epoch
    epoch_t0, epoch_steps = time.perf_counter(), 0
    t_last = time.perf_counter()
    for step in range(start, stop):
        epoch, it = divmod(step, iters)
        if epoch != perm_epoch:
            perm, perm_epoch = _epoch_order(cfg.seed, epoch, n), epoch
        idx = perm[it * gb:(it + 1) * gb][rank * per_rank:(rank + 1) * per_rank]
        lr, wd, mom = float(sched["lr"][step]), float(sched["wd"][step]), float(sched["momentum"][step])
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr
            if i == 0:
                group["weight_decay"] = wd
        gen = _step_generator(cfg.seed, rank, step)
        views = crops(bank.images[idx.to(device, non_blocking=True)], bank.sizes[idx], gen)
        stats: dict[str, torch.Tensor] = {}
        loss = train_step(model, teacher, optimizer, views, p, gen, mom, autocast,
                          freeze_prototypes=step < p.freeze_prototypes_iters, stats=stats)

        now = time.perf_counter()
        dt, t_last = now - t_last, now
        pending.append({"step": step, "epoch": epoch, "loss": loss, **stats, "lr": lr, "wd": wd, "momentum": mom,
                        "step_time": dt, "images_per_s": gb / max(dt, 1e-9)})
        bar.update(1)
        epoch_steps += 1
        end_of_epoch = it == iters - 1
        if len(pending) >= max(1, p.log_every) or end_of_epoch or step == stop - 1:
            flush()
        if end_of_epoch:
            if main:
                secs = time.perf_counter() - epoch_t0
                append_jsonl(out / "log.jsonl", {"epoch": epoch, "step": step + 1, "loss": float(np.mean(epoch_losses)),
                                                 **{k: float(np.mean(x)) for k, x in epoch_stats.items()},
                                                 "lr": lr, "wd": wd, "momentum": mom, "time_s": secs,
                                                 "images_per_s": epoch_steps * gb / max(secs, 1e-9)})
            epoch_losses.clear()
            epoch_stats.clear()
            epoch_t0, epoch_steps = time.perf_counter(), 0
            save(step + 1, done=step + 1 == total)
        elif step == stop - 1:
            save(step + 1, done=False)
    bar.close()
    if start >= stop and main:  # nothing to train: the checkpoint covers this call; re-derive its exports
        export()
        mark(start)
    if world > 1:
        dist.barrier()
    return out


__all__ = ["SwAVHead", "SwAVNet", "build_student", "param_groups", "ema_update", "student_views",
           "pretrain_loss", "train_step", "schedules", "run_pretrain", "CSV_COLUMNS"]
