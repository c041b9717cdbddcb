"""One typed configuration, loaded from ``params.yaml``.

Every field has the paper's default; the comment says what it means and what to try.
``load_params(path, overrides)`` reads YAML, applies ``section.field=value`` overrides
and rejects unknown keys (a typo is an error, not a silent default).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_type_hints

import yaml

# ---- every choice, in one table: a field that takes one of a few strings is typed with one of these
# Literals, and the value is checked against it once, when the section is built (:func:`check_value`).
# Modules that need the values import the tuples below (``choices(...)``) instead of writing them again.
Dataset = Literal["mvtec", "nih", "demo", "folder"]                     # data.dataset
MaskKind = Literal["apmask", "random", "block", "none"]                 # pretrain.mask (Table 4)
TeacherView = Literal["second", "same"]                                 # pretrain.teacher_view
RankSource = Literal["view", "image"]                                   # pretrain.rank_source
HeadNorm = Literal["none", "batchnorm"]                                 # pretrain.head_norm
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs", "aot_eager"]  # *.compile
AnomalyKind = Literal["attention", "cutpaste", "scar", "nsa", "fpi"]    # finetune.anomaly (Table 3 bottom)
Poisson = Literal["auto", "on", "off"]                                  # finetune.poisson (YAML on/off/yes/no/true/false read as on/off)
SegMaps = Literal["heads", "heads_full", "tokens"]                      # finetune.seg_maps
SegTransform = Literal["log", "linear"]                                 # finetune.seg_transform
Blend = Literal["auto", "normal", "mixed"]                              # finetune.blend
DiceReduction = Literal["batch", "mean"]                                # finetune.dice
ImageScore = Literal["det_mean", "map_max"]                             # evaluate.score
ThresholdOn = Literal["auto", "val", "test"]                            # evaluate.threshold_on
KnnBackbone = Literal["init", "finetuned"]                              # evaluate.knn_backbone
KnnSigmaAt = Literal["output", "input"]                                 # evaluate.knn_sigma_at
Fusion = Literal["knn", "fused"]                                        # evaluate.fusion
KnnAspect = Literal["square", "keep"]                                   # evaluate.knn_aspect
KnnFeatures = Literal["auto", "fp32", "bf16"]                           # evaluate.knn_features
KnnSearch = Literal["exact", "bf16"]                                    # evaluate.knn_search
KnnBankDtype = Literal["fp32", "fp16"]                                  # evaluate.knn_bank_dtype
LrScaling = Literal["absolute", "linear"]                               # pretrain.lr_scaling


def choices(tp: Any) -> tuple[str, ...]:
    """The allowed values of a choice type (``Literal[...]``, or ``Optional`` of one); () otherwise."""
    tp, _ = _optional(tp)
    return tuple(typing.get_args(tp)) if typing.get_origin(tp) is Literal else ()


def _optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of ``Optional[X]`` / ``X | None``; (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), True
    return tp, False


MASK_KINDS = choices(MaskKind)
RANK_SOURCES = choices(RankSource)
TEACHER_VIEWS = choices(TeacherView)
COMPILE_MODES = choices(CompileMode)
ANOMALY_KINDS = choices(AnomalyKind)
SEG_MAPS = choices(SegMaps)
SEG_TRANSFORMS = choices(SegTransform)
IMAGE_SCORES = choices(ImageScore)
THRESHOLD_ON = choices(ThresholdOn)
KNN_BACKBONES = choices(KnnBackbone)
KNN_SIGMA_AT = choices(KnnSigmaAt)
FUSIONS = choices(Fusion)

# ---- every constraint on a number, in one table, checked once when a section is built (a value outside
# it is an error naming the key, never a run that "finishes" with an impossible schedule).
# ("section.key"): ("int>0" | "int>=0" | "num>0" | "num>=0" | "[0,1]" | "[0,1)" | "(0,1]" | "sizes>0" | "range(0,1]")
# ``None`` is allowed exactly where the field is Optional; choices are the Literal types above.
CONSTRAINTS: dict[str, Any] = {
    "seed": "int>=0",
    "data.normal_test_split": "[0,1)", "data.normal_val_split": "[0,1)", "data.split_seed": "int>=0",
    "data.image_size": "int>0", "data.max_train": "int>0", "data.max_test": "int>0",
    "pretrain.epochs": "int>0", "pretrain.batch_size": "int>0", "pretrain.mask_ratio": "[0,1)",
    "pretrain.n_local": "int>=0", "pretrain.global_size": "int>0", "pretrain.local_size": "int>0",
    "pretrain.global_scale": "range(0,1]", "pretrain.local_scale": "range(0,1]",
    "pretrain.out_dim": "int>0", "pretrain.hidden_dim": "int>0", "pretrain.bottleneck_dim": "int>0",
    "pretrain.n_prototypes": "int>0", "pretrain.temperature": "num>0", "pretrain.sinkhorn_eps": "num>0",
    "pretrain.sinkhorn_iters": "int>0", "pretrain.queue_length": "int>=0", "pretrain.lr": "num>=0", "pretrain.start_lr": "num>=0",
    "pretrain.min_lr": "num>=0", "pretrain.warmup_epochs": "int>=0", "pretrain.weight_decay": "num>=0",
    "pretrain.weight_decay_end": "num>=0", "pretrain.clip_grad": "num>=0", "pretrain.momentum_teacher": "[0,1]",
    "pretrain.freeze_prototypes_iters": "int>=0", "pretrain.num_workers": "int>=0", "pretrain.log_every": "int>0",
    "finetune.epochs": "int>0", "finetune.batch_size": "int>0", "finetune.det_weight": "num>=0",
    "finetune.seg_weight": "num>=0", "finetune.anomaly_fraction": "[0,1]", "finetune.lr": "num>=0",
    "finetune.start_lr": "num>=0", "finetune.min_lr": "num>=0", "finetune.warmup_epochs": "int>=0",
    "finetune.weight_decay": "num>=0", "finetune.clip_grad": "num>=0", "finetune.num_workers": "int>=0",
    "finetune.attention_temperature": "num>0", "finetune.hflip": "[0,1]", "finetune.normal_jitter": "num>=0",
    "finetune.log_every": "int>0", "finetune.val_fraction": "[0,1)", "finetune.val_max_images": "int>0",
    "finetune.backbone_lr_scale": "num>=0", "finetune.layer_decay": "(0,1]", "finetune.ema": "[0,1)",
    "evaluate.scales": "sizes>0", "evaluate.batch_size": "int>0",
    "evaluate.pro_fpr_limit": "(0,1]", "evaluate.pixel_bins": "int>0", "evaluate.figure_images": "int>=0",
    "evaluate.knn_layer": "int>=0", "evaluate.knn_sizes": "sizes>0",
    "evaluate.knn_k": "int>0", "evaluate.knn_coreset": "(0,1]", "evaluate.knn_bank_max": "int>0",
    "evaluate.knn_sigma": "num>=0",
    "evaluate.knn_holdout": "[0,1)", "evaluate.threshold_quantile": "[0,1]",
    "evaluate.pixel_threshold_quantile": "[0,1]",
}

# keys added after runs were written, with the value that reproduces the older behaviour: left out of
# resume fingerprints while they hold it, so checkpoints written before the key existed still resume
# (values as after a JSON round trip: a tuple reads back as a list)
FINGERPRINT_OMIT_AT = {("pretrain", "rank_source"): "view", ("pretrain", "queue_length"): 0, ("pretrain", "lr_scaling"): "absolute",
                       ("finetune", "backbone_lr_scale"): 1.0, ("finetune", "layer_decay"): 1.0, ("finetune", "ema"): 0.0,
                       **{("data", k): v for k, v in (("normal_dir", None), ("abnormal_dir", []), ("mask_dir", None),
                                                      ("normal_test_dir", None), ("normal_test_split", 0.2),
                                                      ("normal_val_split", 0.1), ("split_seed", 0))}}


@dataclass
class DataConfig:
    dataset: Dataset = "demo"        # mvtec | nih | demo | folder (your own images, README "Your own images")
    root: str = "data/demo"          # dataset root (MVTec: the folder holding the category folders)
    category: str = "brick"          # MVTec/demo category; NIH: all | male | female
    image_size: int = 224            # training resolution (square)
    max_train: Optional[int] = None  # cap on training images (micro runs); None = all
    max_test: Optional[int] = None   # cap on test images per defect type (micro runs); None = all
    # --- dataset: folder only (apmask_lib/data/folder.py); folders relative to root, searched recursively ---
    normal_dir: Optional[str] = None       # normal images (required)
    abnormal_dir: tuple[str, ...] = ()     # defect folders, one or several (each folder name = a defect type)
    mask_dir: Optional[str] = None         # masks <mask_dir>/[<defect>/]<stem>[_mask].*; absent = image-level metrics only
    normal_test_dir: Optional[str] = None  # normal test images; None = hold out normal_test_split of normal_dir
    normal_test_split: float = 0.2         # fraction of normal_dir held out for testing (seeded by split_seed)
    normal_val_split: float = 0.1          # fraction of normal_dir held out as validation: the decision threshold is chosen there
    split_seed: int = 0                    # seed of the normal-image split (independent of the training seed)

    def __post_init__(self):
        validate(self, "data")


@dataclass
class PretrainConfig:
    epochs: int = 300                # paper: 300
    batch_size: int = 16             # paper: 16
    mask: MaskKind = "apmask"        # apmask | random | block | none   (Table 4)
    mask_ratio: float = 0.3          # r: fraction of patch tokens dropped, paper 0.3; try 0.15, 0.5
    n_local: int = 8                 # local crops per image
    global_size: int = 224
    local_size: int = 96
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    out_dim: int = 256               # projection head output (l2 bottleneck)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    n_prototypes: int = 20           # K
    temperature: float = 0.1         # tau in softmax(z.C / tau)
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    queue_length: int = 0            # SwAV's feature queue for small batches: the last L teacher embeddings join Sinkhorn's equal partition
                                     # (apmask_lib/pretrain/sinkhorn.py); 0 = no queue. Not checkpointed: a resumed run starts with an empty queue
    lr: float = 5e-4                 # peak LR after warm-up (read as lr_scaling says)
    lr_scaling: LrScaling = "linear"  # linear = DINO's rule lr * global batch / 256 (the paper's 5e-4 at batch 16 -> 3.1e-5; chosen by the
                                     # probe, docs/reproducibility.md) | absolute = lr as written; the effective peak is in log.csv's lr column
                                     # (pretrain.peak_lr, docs/method.md "Where we differ")
    start_lr: float = 1e-5           # warm-up start
    min_lr: float = 1e-6             # cosine floor
    warmup_epochs: int = 10
    weight_decay: float = 0.04       # DINO: cosine 0.04 -> 0.4
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    momentum_teacher: float = 0.996  # EMA momentum, cosine to 1
    freeze_prototypes_iters: int = 0  # SwAV's freeze_prototypes_niters: the prototypes get no update for the first N steps (0 = never frozen)
    head_norm: HeadNorm = "none"     # pre-training projection head: "none" = DINO's GELU MLP without normalisation; "batchnorm" = BatchNorm1d after
                                     # each hidden Linear, batch statistics in train and eval (SwAV's head; DINO's use_bn), docs/experiments.md "Is pre-training learning?"
    num_workers: int = 2
    teacher_view: TeacherView = "second"  # teacher's unmasked global view: "second" = another global crop (DINO/SwAV), "same" = the student's global crop unmasked
    rank_source: RankSource = "view"  # mask=apmask, where the teacher's [CLS] attention that ranks a view's patches is taken: "view" = on that student view
                                     # (one teacher pass per view size); "image" = once on the whole image at global_size, resampled onto each view's
                                     # crop box (fewer teacher tokens, docs/method.md); quality at the full schedule not yet compared
    log_every: int = 20              # steps between loss read-backs (host syncs) / CSV rows flushed; NaN is caught at these points
    compile: CompileMode = "none"    # torch.compile each ViT block: none | default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs | aot_eager (apmask_lib/core/fastpath.py); same maths

    def __post_init__(self):
        validate(self, "pretrain")


@dataclass
class FinetuneConfig:
    epochs: int = 100                # paper: 100
    batch_size: int = 16
    init: str = "pretrain"           # "pretrain" = this run's pre-trained backbone, or a backbone source string
    anomaly: AnomalyKind = "attention"  # attention | cutpaste | scar | nsa | fpi   (Table 3 bottom)
    poisson: Poisson = "auto"        # auto (on for nih) | on | off
    seg_maps: SegMaps = "heads"      # which last-layer attention maps feed the segmentation (see finetune docs)
    det_weight: float = 0.95
    seg_weight: float = 0.05
    anomaly_fraction: float = 0.5    # fraction of each batch made synthetic
    lr: float = 5e-5                 # peak LR. The paper gives none for fine-tuning; its pre-training peak (5e-4)
                                     # collapsed fine-tuning to chance here (loss_det stuck at ln 2 on the demo),
                                     # 5e-5 did not (docs/experiments.md)
    start_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    clip_grad: float = 3.0
    num_workers: int = 2
    blend: Blend = "auto"            # Poisson mode: auto (mixed for nih and MVTec textures, else normal) | normal | mixed
    attention_temperature: float = 1.0  # T in softmax(standardised attention / T) for where to cut/paste; larger = more uniform
    hflip: Optional[float] = None    # probability of flipping a normal image before anomalies are made; None = by dataset: 0 for nih (a chest
                                     # X-ray's left and right differ: the heart), 0.5 otherwise (finetune.resolve_hflip)
    normal_jitter: float = 0.05      # colour-jitter strength applied to normal images before anomalies are made
    dice: DiceReduction = "batch"    # Dice reduction: batch (jointly over the batch; defined with empty masks) | mean (per image)
    seg_transform: SegTransform = "log"  # attention maps fed to the segmentation: log(N*a) | linear (N*a)
    log_every: int = 20              # steps between loss read-backs (host syncs); NaN is caught at these points and at epoch ends
    compile: CompileMode = "none"    # as pretrain.compile (apmask_lib/core/fastpath.py)
    val_fraction: float = 0.1        # fraction of the normal training images held out of fine-tuning for the label-free validation signal
                                     # (synthetic anomalies on them, scored per epoch: apmask_lib/finetune/validation.py); 0 = none, train on all
    val_max_images: Optional[int] = 32  # cap on the held-out images (each is scored normal + anomalous every epoch); None = no cap
    # --- stabilisers (not in the paper; docs/reproducibility.md "Run-to-run spread"): the defaults leave the paper's optimisation as it is ---
    backbone_lr_scale: float = 1.0   # learning-rate multiplier of every backbone parameter (the new heads keep 1); 0 = frozen backbone
    layer_decay: float = 1.0         # layer-wise LR decay (BEiT/MAE fine-tuning): block i of L gets layer_decay^(L - i), embeddings the least; 1 = off
    ema: float = 0.0                 # EMA of the fine-tuned weights (momentum, warmed up as min(ema, (1+t)/(10+t))); model.pt and validation use
                                     # the average; 0 = off (the last weights)

    def __post_init__(self):
        validate(self, "finetune")


@dataclass
class EvaluateConfig:
    scales: tuple[int, ...] = (224, 320, 384, 416, 448, 512)
    batch_size: int = 8
    score: ImageScore = "det_mean"   # image score for AUROC: det_mean (mean detection prob. over scales) | map_max
    pro_fpr_limit: float = 0.3
    pixel_bins: Optional[int] = 1048576  # pixel metrics: histogram bins over [0, 1] (2^20, memory-bounded); None = exact (small sets)
    figure_images: int = 8           # images in the localisation figure (defect types first, then good)
    save_maps: bool = False          # also write every averaged map to evaluate/maps/<defect>/<stem>.npy (float16)
    # --- decision threshold (apmask_lib/evaluate/threshold.py) -> evaluate/threshold.json, read by apmask predict/export ---
    threshold_on: ThresholdOn = "auto"  # auto (validation images when the data set has them, else the test set, stated as optimistic) | val | test
    threshold_quantile: float = 0.99          # no anomalous images in that data: this quantile of normal image scores
    pixel_threshold_quantile: float = 0.999   # no masks in that data: this quantile of normal images' map values
    # --- EXTENSION (not in the paper; apmask_lib/knn/scoring.py): kNN patch scoring on intermediate features ---
    knn_layer: Optional[int] = None  # block (0-based) whose patch tokens feed a kNN memory bank; None = paper method only (default); AnomalyDINO-style: 7 (8th of 12)
    knn_backbone: KnnBackbone = "init"  # kNN features: init = cfg.backbone before any training (training-free) | finetuned = the detector's backbone
    knn_sizes: tuple[int, ...] = (224, 448)  # input sizes of the kNN branch (snapped to the patch size), maps/scores averaged as the paper averages scales; AnomalyDINO alone: (448,)
    knn_k: int = 1                   # neighbours averaged per patch (AnomalyDINO: 1)
    knn_coreset: float = 1.0         # fraction of training patches kept in the bank (greedy coreset); 1.0 = all (AnomalyDINO full-shot)
    knn_bank_max: Optional[int] = 10000  # at most this many patches per bank (per input size), kept by the greedy coreset; None = no cap (every patch, AnomalyDINO full-shot). 10000: within 0.12 points of the full bank on all five data sets, time and file bounded whatever the training set (results/knn_bank.md, results/knn_scaling.md)
    knn_bank_dtype: KnnBankDtype = "fp16"  # storage of the banks (memory, model file): fp16 (half the size; the search still multiplies in fp32; metrics equal to fp32 to 0.01 on all five data sets, results/knn_bank.md) | fp32
    knn_sigma: float = 4.0           # Gaussian smoothing of kNN maps in pixels (PatchCore/AnomalyDINO: 4), at the resolution knn_sigma_at names
    knn_sigma_at: KnnSigmaAt = "output"  # where knn_sigma applies: output = the image's stored size (AnomalyDINO's dists2map) | input = the network input size (PatchCore/anomalib); results/knn_readout.md
    knn_aspect: KnnAspect = "square"  # kNN input shape: square = every image stretched to size x size (AnomalyDINO/PatchCore) | keep = each image's own aspect ratio at about as many patches (results/knn_aspect.md)
    knn_features: KnnFeatures = "auto"  # kNN feature precision: auto = fp32 on the CPU, bf16 autocast on CUDA | fp32 | bf16 (on the CPU a bf16 copy of the backbone: an APPROXIMATION, about 3x faster; results/knn_speed.md)
    knn_search: KnnSearch = "exact"  # nearest neighbours: exact (fp32 brute force) | bf16 (chosen on bf16 products, distances recomputed in fp32: an APPROXIMATION; results/knn_speed.md)
    fusion: Fusion = "knn"           # with knn_layer set, extension outputs: knn (kNN alone) | fused (also z-normalised kNN + detector; helped only where the detector is good, results/quality*.md); in metrics.json under methods.*, top-level keys stay the paper method's
    knn_holdout: float = 0.1         # fraction of training images held out of a bank to estimate the normal statistics used by fusion

    def __post_init__(self):
        validate(self, "evaluate")


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    backbone: str = "dinov2-s14-offline"  # dino | file:PATH | dinov2-s14-offline | random[:ARCH]
    out_dir: Optional[str] = None    # run folder; None = runs/adhoc/<dataset>/<category>/s<seed> (adhoc_out_dir), so an ad-hoc
                                     # run never writes into a pipeline run (the DVC stages pass runs/demo/... explicitly)
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def __post_init__(self):
        if not self.out_dir:
            self.out_dir = adhoc_out_dir(self)
        validate(self, "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adhoc_out_dir(cfg: Config) -> str:
    """The run folder of a run that names none: ``runs/adhoc/<dataset>/<category>/s<seed>``,
    derived from the data and seed, and outside the pipeline's folders."""
    return f"runs/adhoc/{cfg.data.dataset}/{cfg.data.category}/s{cfg.seed}"


def _coerce(tp: Any, value: Any, where: str = "") -> Any:
    """Light type coercion: lists -> tuples, ints and numeric strings (YAML reads ``5e-5`` as a
    string) -> floats, integer strings -> ints; a non-numeric value for a number field is an error
    naming the key. Types and ranges are then checked by :func:`validate`."""
    tp, _ = _optional(tp)
    if isinstance(value, bool) and {"on", "off"} <= set(choices(tp)):
        return "on" if value else "off"  # YAML 1.1 reads on/off/yes/no/true/false as booleans
    origin = getattr(tp, "__origin__", None)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is int and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_value(key: str, value: Any, tp: Any = None) -> None:
    """Raise ValueError naming ``key`` unless ``value`` has the type ``tp`` (int / float / tuple of
    those / one of a ``Literal``'s values; None where Optional) and satisfies ``CONSTRAINTS[key]``."""
    inner, optional = _optional(tp) if tp is not None else (None, False)
    if value is None:
        if optional:
            return
        raise ValueError(f"{key}: a value is required, got null")
    allowed = choices(inner)
    if allowed:
        if value not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        return
    if inner is int and not _is_int(value):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if inner is float and not _is_num(value):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    rule = CONSTRAINTS.get(key)
    if rule is None:
        return
    if rule in ("sizes>0", "range(0,1]"):
        if not isinstance(value, (tuple, list)) or not value:
            raise ValueError(f"{key}: expected a non-empty list, got {value!r}")
        if rule == "sizes>0" and not all(_is_int(v) and v > 0 for v in value):
            raise ValueError(f"{key}: every size must be a positive integer, got {list(value)}")
        if rule == "range(0,1]" and not (len(value) == 2 and all(_is_num(v) and 0 < v <= 1 for v in value)
                                         and value[0] <= value[1]):
            raise ValueError(f"{key}: expected [low, high] with 0 < low <= high <= 1, got {list(value)}")
        return
    kind, _, bound = rule.partition(">") if rule.startswith(("int", "num")) else ("num", "", rule)
    if kind == "int" and not _is_int(value):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if not _is_num(value):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    ok = {"0": value > 0, "=0": value >= 0, "[0,1]": 0 <= value <= 1, "[0,1)": 0 <= value < 1,
          "(0,1]": 0 < value <= 1}[bound]
    if not ok:
        what = {"0": "> 0", "=0": ">= 0", "[0,1]": "in [0, 1]", "[0,1)": "in [0, 1)", "(0,1]": "in (0, 1]"}[bound]
        raise ValueError(f"{key} must be {what}, got {value!r}")


def validate(section_obj: Any, section: str) -> None:
    """Check every field of one config section against its type and :data:`CONSTRAINTS`
    (called by each section's ``__post_init__``, so a config object never holds an impossible value)."""
    hints = get_type_hints(type(section_obj))
    for f in fields(section_obj):
        tp = hints[f.name]
        if is_dataclass(tp):
            continue
        check_value(f"{section}.{f.name}" if section else f.name, getattr(section_obj, f.name), tp)


def _build(cls, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, f"{where}.{f.name}")
        else:
            kwargs[f.name] = _coerce(tp, data[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "params")


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``["pretrain.epochs=2", "data.category: bottle"]`` -> nested dict updates (YAML-parsed values)."""
    for item in overrides or []:
        if "=" in item:
            key, raw = item.split("=", 1)
        elif ": " in item:  # "section.key: value" (the form the notebooks' comments use)
            key, raw = item.split(": ", 1)
        else:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key = key.strip()
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: its value is not valid YAML ({e})") from None
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path``; a syntax error names the file, line and column."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        raise ValueError(f"YAML syntax error in {where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"YAML error in {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of sections (data:, pretrain:, ...), got {type(data).__name__}")
    return data


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``params.yaml`` (or defaults when ``path`` is None) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"params file not found: {p}")
        data = read_yaml(p)
        data.pop("pipeline", None)  # DVC-only settings (categories, seeds, variants)
    data = apply_overrides(data, overrides)
    return from_dict(data)


def replace(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Copy of ``cfg`` with fields of sections replaced, e.g. ``replace(cfg, pretrain={"epochs": 1})``."""
    d = cfg.to_dict()
    for name, upd in sections.items():
        if isinstance(d.get(name), dict):
            d[name].update(upd)
        else:
            d[name] = upd
    return from_dict(d)


__all__ = ["choices", "MASK_KINDS", "RANK_SOURCES", "TEACHER_VIEWS", "COMPILE_MODES", "ANOMALY_KINDS", "SEG_MAPS",
           "SEG_TRANSFORMS", "IMAGE_SCORES", "THRESHOLD_ON", "KNN_BACKBONES", "KNN_SIGMA_AT", "FUSIONS", "CONSTRAINTS", "check_value", "validate", "read_yaml", "FINGERPRINT_OMIT_AT",
           "Config", "DataConfig", "PretrainConfig", "FinetuneConfig", "EvaluateConfig", "adhoc_out_dir", "load_params",
           "from_dict", "apply_overrides", "replace", "dataclasses"]
