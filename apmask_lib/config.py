"""One typed configuration, loaded from ``params.yaml``.

Every field has the paper's default; the comment says what it means and what to try.
``load_params(path, overrides)`` reads YAML, applies ``section.field=value`` overrides
and rejects unknown keys (a typo is an error, not a silent default).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_type_hints

import yaml

RANK_SOURCES = ("view", "image")    # pretrain.rank_source values

# keys added after runs were written, with the value that reproduces the older behaviour: left out of
# resume fingerprints while they hold it, so checkpoints written before the key existed still resume
FINGERPRINT_OMIT_AT = {("pretrain", "rank_source"): "view"}


@dataclass
class DataConfig:
    dataset: str = "demo"            # mvtec | nih | demo
    root: str = "data/demo"          # dataset root (MVTec: the folder holding the category folders)
    category: str = "brick"          # MVTec/demo category; NIH: all | male | female
    image_size: int = 224            # training resolution (square)
    max_train: Optional[int] = None  # cap on training images (micro runs); None = all
    max_test: Optional[int] = None   # cap on test images per defect type (micro runs); None = all


@dataclass
class PretrainConfig:
    epochs: int = 300                # paper: 300
    batch_size: int = 16             # paper: 16
    mask: str = "apmask"             # apmask | random | block | none   (Table 4)
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
    lr: float = 5e-4                 # peak LR after warm-up
    start_lr: float = 1e-5           # warm-up start
    min_lr: float = 1e-6             # cosine floor
    warmup_epochs: int = 10
    weight_decay: float = 0.04       # DINO: cosine 0.04 -> 0.4
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    momentum_teacher: float = 0.996  # EMA momentum, cosine to 1
    freeze_prototypes_iters: int = 0
    num_workers: int = 2
    teacher_view: str = "second"     # teacher's unmasked global view: "second" = another global crop (DINO/SwAV), "same" = the student's global crop unmasked
    rank_source: str = "view"        # mask=apmask, where the teacher's [CLS] attention that ranks a view's patches is taken: "view" = on that student view
                                     # (one teacher pass per view size); "image" = once on the whole image at global_size, resampled onto each view's
                                     # crop box (fewer teacher tokens, README "Design choices"); quality at the full schedule not yet compared
    log_every: int = 20              # steps between loss read-backs (host syncs) / CSV rows flushed; NaN is caught at these points
    compile: str = "none"            # torch.compile each ViT block: none | default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs | aot_eager (apmask_lib/fastpath.py); same maths

    def __post_init__(self):
        if self.rank_source not in RANK_SOURCES:
            raise ValueError(f"pretrain.rank_source must be one of {', '.join(RANK_SOURCES)}, got {self.rank_source!r}")


@dataclass
class FinetuneConfig:
    epochs: int = 100                # paper: 100
    batch_size: int = 16
    init: str = "pretrain"           # "pretrain" = this run's pre-trained backbone, or a backbone source string
    anomaly: str = "attention"       # attention | cutpaste | scar | nsa | fpi   (Table 3 bottom)
    poisson: str = "auto"            # auto (on for nih) | on | off
    seg_maps: str = "heads"          # which last-layer attention maps feed the segmentation (see finetune docs)
    det_weight: float = 0.95
    seg_weight: float = 0.05
    anomaly_fraction: float = 0.5    # fraction of each batch made synthetic
    lr: float = 5e-5                 # peak LR. The paper gives none for fine-tuning; its pre-training peak (5e-4)
                                     # collapsed fine-tuning to chance here (loss_det stuck at ln 2 on the demo),
                                     # 5e-5 did not (README, "Fine-tuning learning rate")
    start_lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    clip_grad: float = 3.0
    num_workers: int = 2
    blend: str = "auto"              # Poisson mode: auto (mixed for nih and MVTec textures, else normal) | normal | mixed
    attention_temperature: float = 1.0  # T in softmax(standardised attention / T) for where to cut/paste; larger = more uniform
    hflip: Optional[float] = None    # probability of flipping a normal image before anomalies are made; None = by dataset: 0 for nih (a chest
                                     # X-ray's left and right differ: the heart), 0.5 otherwise (finetune.resolve_hflip)
    normal_jitter: float = 0.05      # colour-jitter strength applied to normal images before anomalies are made
    dice: str = "batch"              # Dice reduction: batch (jointly over the batch; defined with empty masks) | mean (per image)
    seg_transform: str = "log"       # attention maps fed to the segmentation: log(N*a) | linear (N*a)
    log_every: int = 20              # steps between loss read-backs (host syncs); NaN is caught at these points and at epoch ends
    compile: str = "none"            # as pretrain.compile (apmask_lib/fastpath.py)
    val_fraction: float = 0.1        # fraction of the normal training images held out of fine-tuning for the label-free validation signal
                                     # (synthetic anomalies on them, scored per epoch: apmask_lib/validation.py); 0 = none, train on all
    val_max_images: Optional[int] = 32  # cap on the held-out images (each is scored normal + anomalous every epoch); None = no cap


@dataclass
class EvaluateConfig:
    scales: tuple[int, ...] = (224, 320, 384, 416, 448, 512)
    batch_size: int = 8
    score: str = "det_mean"          # image score for AUROC: det_mean (mean detection prob. over scales) | map_max
    pro_fpr_limit: float = 0.3
    pixel_bins: Optional[int] = 1048576  # pixel metrics: histogram bins over [0, 1] (2^20, memory-bounded); None = exact (small sets)
    figure_images: int = 8           # images in the localisation figure (defect types first, then good)
    save_maps: bool = False          # also write every averaged map to evaluate/maps/<defect>/<stem>.npy (float16)
    # --- EXTENSION (not in the paper; apmask_lib/knn.py): kNN patch scoring on intermediate features ---
    knn_layer: Optional[int] = None  # block (0-based) whose patch tokens feed a kNN memory bank; None = paper method only (default); AnomalyDINO-style: 7 (8th of 12)
    knn_backbone: str = "init"       # kNN features: init = cfg.backbone before any training (training-free) | finetuned = the detector's backbone
    knn_sizes: tuple[int, ...] = (224, 448)  # input sizes of the kNN branch (snapped to the patch size), maps/scores averaged as the paper averages scales; AnomalyDINO alone: (448,)
    knn_k: int = 1                   # neighbours averaged per patch (AnomalyDINO: 1)
    knn_coreset: float = 1.0         # fraction of training patches kept in the bank (greedy coreset); 1.0 = all (AnomalyDINO full-shot)
    knn_sigma: float = 4.0           # Gaussian smoothing of kNN maps in pixels (PatchCore/AnomalyDINO: 4), at the resolution knn_sigma_at names
    knn_sigma_at: str = "output"     # where knn_sigma applies: output = the image's stored size (AnomalyDINO's dists2map) | input = the network input size (PatchCore/anomalib); results/knn_readout.md
    fusion: str = "knn"              # with knn_layer set, extension outputs: knn (kNN alone) | fused (also z-normalised kNN + detector; helped only where the detector is good, results/quality*.md); in metrics.json under methods.*, top-level keys stay the paper method's
    knn_holdout: float = 0.1         # fraction of training images held out of a bank to estimate the normal statistics used by fusion


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    backbone: str = "dinov2-s14-offline"  # dino | file:PATH | dinov2-s14-offline | random[:ARCH]
    out_dir: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(tp: Any, value: Any, where: str = "") -> Any:
    """Light type coercion: lists -> tuples, ints and numeric strings (YAML reads ``5e-5`` as a
    string) -> floats; a non-numeric value for a number field is an error naming the key."""
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
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``params.yaml`` (or defaults when ``path`` is None) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"params file not found: {p}")
        data = yaml.safe_load(p.read_text()) or {}
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


__all__ = ["RANK_SOURCES", "FINGERPRINT_OMIT_AT", "Config", "DataConfig", "PretrainConfig", "FinetuneConfig",
           "EvaluateConfig", "load_params", "from_dict", "apply_overrides", "replace", "dataclasses"]
