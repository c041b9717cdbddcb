"""The kNN extension as a model of its own: fitted without any training, saved, evaluated, used to
predict and exported like the fine-tuned detector (NOT part of the paper).

``apmask fit --method knn`` (:func:`fit_knn_model`) builds ``cfg.backbone`` as it is (no pre-training,
no fine-tuning), extracts the block-``evaluate.knn_layer`` patch features of the training images
(``data.max_train`` of them) at each size of ``evaluate.knn_sizes`` and keeps them as memory banks
(:class:`~apmask_lib.knn.bank.MemoryBank`: ``evaluate.knn_coreset`` / ``knn_bank_max`` greedy coreset,
``knn_bank_dtype`` storage). It writes ``OUT_DIR/knn/``:

  model.pt      format ``apmask-knn-v1``, read with ``torch.load(weights_only=True)``: the backbone
                truncated after block ``layer`` (its ViTConfig with depth = layer + 1, and its state
                dict), one bank (M_s, C) per size (float32, or float16 with ``knn_bank_dtype=fp16``), the
                read-out settings, the run's config as applied (:func:`applied_config`).
  config.json   the configuration as applied: the read-out block, the feature precision, smoothing at
                the input size, square inputs and the model's own sizes as ``evaluate.scales``, whatever
                the file asked for (those settings apply to the extension beside the detector only).

:class:`KnnDetector` is that file as an ``nn.Module`` with the fine-tuned detector's interface
(:class:`~apmask_lib.models.detector.DetectorOutput`), so evaluation, prediction, the threshold and
export take either model. At an input of size s it computes, as :mod:`apmask_lib.knn.scoring` does:

    d_p     = mean over the k nearest bank patches of (1 - <x_p, m>)    cosine distance of patch p
    score   = mean of the top 1 % of {d_p}                                 (AnomalyDINO's image score)
    map     = Gaussian_sigma( bilinear_{s x s}( d on the patch grid ) )    smoothing at the INPUT size

and returns ``logit = logit(score / 2)``, ``seg_logits = logit(map / 2)`` (logit clipped at 1e-6), so
that the sigmoid the detector's callers apply gives the distance halved, in [0, 1]: ``det_mean`` is the
kNN image score / 2 averaged over the sizes and the averaged map is the kNN map / 2. The maps are
smoothed at the network input size (``evaluate.knn_sigma_at="input"``, PatchCore / anomalib): inside a
fixed-size forward pass the image's stored size is unknown. ``cls`` is the mean patch feature (t-SNE).
The paper's majority vote (P > 0.5 at half the scales) has no meaning for distances / 2.

The sizes are the model's own (one bank per size): ``evaluate.scales`` / ``--scales`` do not apply to
it (:func:`run_sizes`). :func:`load_model` reads either kind of model file.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..config import Config, from_dict, replace
from ..data import AnomalyDataset, dataset_from_config
from .bank import BANK_DTYPES
from .scoring import SEARCHES, KnnScorer, distance_map, knn_distances, patch_features_at, top_fraction_mean
from .fusion import bank_features, training_samples
from ..models import ViTConfig, VisionTransformer
from ..weights import build_backbone
from ..models.detector import DetectorOutput
from ..weights import check_finite_weights, load_detector
from ..inference.multiscale import model_patch_size, scale_sizes
from ..core.devices import resolve_device
from ..core.files import load_checkpoint, save_checkpoint, write_json
from ..core.fingerprint import dict_diff
from ..core.rng import seed_everything

log = logging.getLogger(__name__)

KNN_FORMAT = "apmask-knn-v1"
KNN_DIR = "knn"                    # OUT_DIR/knn/model.pt
DEFAULT_LAYER = 7                  # evaluate.knn_layer unset: AnomalyDINO's block (8th of 12)
LOGIT_EPS = 1e-6
# the settings a fitted bank depends on: a re-run with other values must refit (--force)
FIT_KEYS = ("backbone", "seed", "data", "evaluate.knn_layer", "evaluate.knn_sizes", "evaluate.knn_coreset",
            "evaluate.knn_bank_max", "evaluate.knn_bank_dtype", "evaluate.knn_features")
# fit keys added later, with the value that reproduces a model fitted before they existed
FIT_KEYS_SINCE = {"evaluate.knn_bank_max": None, "evaluate.knn_bank_dtype": "fp32"}


class KnnDetector(nn.Module):
    """Memory banks + truncated backbone with the detector's interface (module docstring).

    backbone: a VisionTransformer whose LAST block is the read-out block (``layer = depth - 1``);
    banks: one l2-normalised (M_s, C) bank per size in ``sizes``."""

    def __init__(self, backbone: VisionTransformer, sizes: Sequence[int], banks: Sequence[torch.Tensor], k: int = 1,
                 sigma: float = 4.0, final_norm: bool = True, top_fraction: float = 0.01, features: str = "fp32",
                 search: str = "exact", bank_dtype: str = "fp32"):
        super().__init__()
        if len(sizes) != len(banks) or not sizes:
            raise ValueError(f"one bank per size needed, got {len(sizes)} sizes and {len(banks)} banks")
        self.backbone = backbone.eval()
        self.layer = len(backbone.blocks) - 1
        self.sizes = tuple(int(s) for s in sizes)
        self.k, self.sigma, self.final_norm, self.top_fraction = int(k), float(sigma), bool(final_norm), float(top_fraction)
        if features not in ("fp32", "bf16") or search not in SEARCHES:
            raise ValueError(f"kNN model: features must be fp32 | bf16 and search one of {SEARCHES}, got "
                             f"{features!r}, {search!r}")
        if bank_dtype not in BANK_DTYPES:
            raise ValueError(f"kNN model: bank_dtype must be one of {tuple(BANK_DTYPES)}, got {bank_dtype!r}")
        self.features, self.search, self.bank_dtype = features, search, bank_dtype
        for s, b in zip(self.sizes, banks):
            if b.dim() != 2 or b.shape[1] != backbone.embed_dim or not 1 <= self.k <= b.shape[0]:
                raise ValueError(f"bank for size {s} has shape {tuple(b.shape)}; expected (M >= k={self.k}, "
                                 f"{backbone.embed_dim})")
            self.register_buffer(f"bank_{s}", b.to(BANK_DTYPES[bank_dtype]).contiguous())

    def bank(self, size: int) -> torch.Tensor:
        if size not in self.sizes:
            raise ValueError(f"this kNN model has banks for input sizes {list(self.sizes)} only, got {size}; "
                             "it is run at its own sizes (refit with -S evaluate.knn_sizes=[...] for others)")
        return getattr(self, f"bank_{size}")

    def settings(self) -> dict[str, Any]:
        """What the file stores besides tensors (and what ``metrics.json`` reports)."""
        return {"layer": self.layer, "sizes": list(self.sizes), "k": self.k, "sigma": self.sigma,
                "sigma_at": "input", "final_norm": self.final_norm, "top_fraction": self.top_fraction,
                "features": self.features, "search": self.search, "bank_dtype": self.bank_dtype,
                "bank_patches": [int(self.bank(s).shape[0]) for s in self.sizes]}

    def patch_distances(self, feats: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """(B, N, C) features -> (B, N) mean distance to the k nearest bank rows. Eager: the exact chunked
        search :func:`~apmask_lib.knn.scoring.knn_distances` (``search``: exact, or bf16 candidates re-ranked in
        fp32); traced (export): one exact fp32 matrix product and a top-k / max over the bank, the same
        maths in a form ONNX holds (memory B * N * M)."""
        b, n, c = feats.shape
        if torch.jit.is_tracing():
            sim = feats.reshape(b * n, c) @ bank.to(feats.dtype).T
            top = sim.amax(dim=1, keepdim=True) if self.k == 1 else sim.topk(self.k, dim=1).values
            d = (1.0 - top).clamp_min(0.0)
        else:
            d = knn_distances(feats.reshape(b * n, c), bank, self.k, search=self.search)
        return d.mean(dim=1).reshape(b, n)

    def forward(self, images: torch.Tensor) -> DetectorOutput:
        h, w = int(images.shape[-2]), int(images.shape[-1])
        if h != w:
            raise ValueError(f"the kNN model takes square inputs at its sizes {list(self.sizes)}, got {h}x{w}")
        # a CPU trace (export) stays exact fp32: a bf16 copy of the backbone is no part of the exported graph
        bf16 = self.features == "bf16" and not (torch.jit.is_tracing() and images.device.type == "cpu")
        feats = patch_features_at(self.backbone, images, self.layer, self.final_norm, bf16=bf16)
        d = self.patch_distances(feats, self.bank(h))
        p = self.backbone.patch_size
        score = top_fraction_mean(d, self.top_fraction)
        amap = distance_map(d, (h // p, w // p), (h, w), self.sigma, "output")
        return DetectorOutput(logit=torch.logit(score / 2.0, eps=LOGIT_EPS),
                              seg_logits=torch.logit(amap / 2.0, eps=LOGIT_EPS), cls=feats.mean(dim=1))


def truncated_backbone(backbone: VisionTransformer, layer: int) -> VisionTransformer:
    """A copy of ``backbone`` holding blocks 0..``layer`` only (the later blocks never run)."""
    depth = len(backbone.blocks)
    if not 0 <= layer < depth:
        raise ValueError(f"evaluate.knn_layer must lie in [0, {depth - 1}] for this {depth}-block backbone, got {layer}")
    cfg = dataclasses.replace(backbone.cfg, depth=layer + 1)
    sd = {k: v for k, v in backbone.state_dict().items()
          if not (k.startswith("blocks.") and int(k.split(".")[1]) > layer)}
    out = VisionTransformer(cfg)
    out.load_state_dict(sd, strict=True)
    return out.eval()


def save_knn_model(path: str | Path, model: KnnDetector, config_dict: Optional[dict[str, Any]] = None,
                   meta: Optional[dict[str, Any]] = None) -> Path:
    """Atomically write ``model`` (module docstring); readable with ``weights_only=True``."""
    path = Path(path)
    save_checkpoint(path, format=KNN_FORMAT, vit_config=dataclasses.asdict(model.backbone.cfg),
                    backbone=model.backbone.state_dict(),
                    knn={k: v for k, v in model.settings().items() if k not in ("layer", "sigma_at", "bank_patches")},
                    banks={str(s): model.bank(s) for s in model.sizes}, config=dict(config_dict or {}),
                    meta=dict(meta or {}))
    return path


def load_knn_model(path: str | Path, ckpt: Optional[dict[str, Any]] = None) -> KnnDetector:
    """Rebuild the model :func:`save_knn_model` wrote (refuses non-finite tensors)."""
    from ..weights.backbones import check_architecture

    path = Path(path)
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != KNN_FORMAT:
        raise ValueError(f"{path} is not an apmask kNN model ({KNN_FORMAT}); `apmask fit --method knn` writes one")
    try:
        vit_cfg = ViTConfig(**ckpt["vit_config"])
        settings, banks = dict(ckpt["knn"]), ckpt["banks"]
        sizes = [int(s) for s in settings.pop("sizes")]
        bank_list = [banks[str(s)] for s in sizes]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: incomplete kNN model ({type(e).__name__}: {e}); refit with apmask fit --method knn") from None
    check_architecture(vit_cfg, ckpt["backbone"], str(path))
    backbone = VisionTransformer(vit_cfg)
    backbone.load_state_dict(ckpt["backbone"], strict=True)
    model = KnnDetector(backbone, sizes, bank_list, **settings)
    check_finite_weights(model, path)
    return model.eval()


def checkpoint_format(path: str | Path) -> Optional[str]:
    """The ``format`` string of an apmask model file, read without loading its tensors (memory-mapped);
    None when it cannot be read that way (the full loader then gives the precise error)."""
    try:
        ckpt = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
        return ckpt.get("format") if isinstance(ckpt, dict) else None
    except Exception:  # noqa: BLE001 - any failure: the loader called next names the file and the reason
        return None


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The fine-tuned detector or the kNN model saved at ``path`` (by its ``format``), in eval mode."""
    if checkpoint_format(path) == KNN_FORMAT:
        return load_knn_model(path)
    return load_detector(path, map_location=map_location)


def model_kind(model: nn.Module) -> str:
    """"knn" for a :class:`KnnDetector`, else "detector"."""
    return "knn" if isinstance(model, KnnDetector) else "detector"


def run_sizes(model: nn.Module, scales: Sequence[int]) -> tuple[int, ...]:
    """The input sizes ``model`` runs at: a kNN model's own (one bank each), else ``scales`` snapped to
    the detector's patch grid (:func:`~apmask_lib.inference.multiscale.scale_sizes`)."""
    if isinstance(model, KnnDetector):
        if tuple(scales) != model.sizes:
            log.info("kNN model: runs at its bank sizes %s (requested scales %s do not apply)", list(model.sizes),
                     list(scales))
        return model.sizes
    return scale_sizes(scales, model_patch_size(model))


def knn_model_path(cfg: Config) -> Path:
    return Path(cfg.out_dir) / KNN_DIR / "model.pt"


def applied_config(cfg: Config, device: torch.device, sizes: Optional[Sequence[int]] = None) -> Config:
    """``cfg`` with the evaluate settings as the kNN model applies them (its ``config.json`` records
    these): the read-out block (``knn_layer`` None -> :data:`DEFAULT_LAYER`), the feature precision
    resolved for ``device``, smoothing at the input size, square inputs, the untouched backbone, the kNN
    read-out alone, and (``sizes`` given) its own sizes as the evaluation scales."""
    ecfg = cfg.evaluate
    features = ecfg.knn_features if ecfg.knn_features != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    ev = {"knn_layer": DEFAULT_LAYER if ecfg.knn_layer is None else int(ecfg.knn_layer), "knn_features": features,
          "knn_sigma_at": "input", "knn_aspect": "square", "knn_backbone": "init", "fusion": "knn"}
    if sizes is not None:
        ev["scales"] = [int(s) for s in sizes]
    return replace(cfg, evaluate=ev)


def evaluated_config(cfg: Config, model: KnnDetector) -> Config:
    """``cfg`` with the read-out settings the fitted ``model`` applies when evaluated (its own block,
    sizes, k, smoothing, precisions), for the evaluation's ``config.json``; the fit-time settings (bank
    size, data) are in the model's own ``config.json``."""
    ev = {"knn_layer": model.layer, "knn_sizes": list(model.sizes), "scales": list(model.sizes), "knn_k": model.k,
          "knn_sigma": model.sigma, "knn_sigma_at": "input", "knn_aspect": "square", "knn_features": model.features,
          "knn_search": model.search, "knn_bank_dtype": model.bank_dtype, "knn_backbone": "init", "fusion": "knn"}
    return replace(cfg, evaluate=ev)


def fit_changes(old: dict[str, Any], new: Config, device: torch.device) -> list[str]:
    """The :data:`FIT_KEYS` in which the configuration ``old`` a model was fitted with (as its file
    stores it) and ``new`` differ, both as applied (:func:`applied_config`); a key of
    :data:`FIT_KEYS_SINCE` missing from ``old`` counts as the value that reproduces such a model."""
    old = {**old, "evaluate": {**{k.split(".", 1)[1]: v for k, v in FIT_KEYS_SINCE.items()},
                               **dict(old.get("evaluate", {}))}}
    try:
        old = applied_config(from_dict(old), device).to_dict()
    except (TypeError, ValueError, KeyError):  # not a configuration this version reads: compare as stored
        pass
    diff = dict_diff(old, applied_config(new, device).to_dict())
    return [k for k in diff if any(k == f or k.startswith(f + ".") for f in FIT_KEYS)]


def fit_knn_model(cfg: Config, dataset: Optional[AnomalyDataset] = None, force: bool = False) -> Path:
    """Fit the memory banks on the training images and write ``OUT_DIR/knn/`` (module docstring).
    A finished fit with the same settings (:data:`FIT_KEYS`) is not redone; different settings need
    ``force``. Returns the model path."""
    ecfg = cfg.evaluate
    path = knn_model_path(cfg)
    device = resolve_device(cfg.device)
    applied = applied_config(cfg, device)
    if path.is_file() and not force:
        diff = fit_changes(load_checkpoint(path).get("config", {}), cfg, device)
        if not diff:
            log.info("kNN model %s is fitted with these settings: kept (--force refits)", path)
            return path
        raise FileExistsError(f"{path} was fitted with other settings ({', '.join(diff)}); pass --force to refit "
                              "it, or choose another out_dir")
    if not ecfg.knn_sizes:
        raise ValueError("evaluate.knn_sizes is empty; give at least one input size, e.g. [224, 448]")
    for key, value in (("knn_aspect", "square"), ("knn_sigma_at", "input"), ("knn_backbone", "init")):
        if getattr(ecfg, key) != value:
            log.info("kNN model: applies evaluate.%s=%s (its config.json records it); evaluate.%s=%s applies to "
                        "the extension beside the detector only (evaluate.knn_layer)", key, value, key, getattr(ecfg, key))
    layer = applied.evaluate.knn_layer
    seed_everything(cfg.seed)
    ds = dataset if dataset is not None else dataset_from_config(cfg.data)
    train = training_samples(cfg, ds)
    backbone = truncated_backbone(build_backbone(cfg.backbone, seed=cfg.seed), layer).to(device)
    banks: dict[int, torch.Tensor] = {}
    fitted: list[int] = []
    for size in ecfg.knn_sizes:
        sc = KnnScorer(backbone, layer, size, k=ecfg.knn_k, sigma=ecfg.knn_sigma, sigma_at="input",
                       coreset=ecfg.knn_coreset, seed=cfg.seed, device=device,
                       feature_bf16=applied.evaluate.knn_features == "bf16", bank_max=ecfg.knn_bank_max,
                       bank_dtype=ecfg.knn_bank_dtype)
        if sc.size in banks:   # sizes that snap to the same grid are used once
            continue
        banks[sc.size] = sc.fit(bank_features(sc, ds, train, ecfg.batch_size)).bank.features.cpu()
        fitted.append(sc.bank.n_fitted)
    model = KnnDetector(backbone.cpu(), list(banks), list(banks.values()), k=ecfg.knn_k, sigma=ecfg.knn_sigma,
                        features=applied.evaluate.knn_features, search=ecfg.knn_search,
                        bank_dtype=ecfg.knn_bank_dtype)
    check_finite_weights(model, f"the kNN model fitted on {ds.name}")
    applied = applied_config(cfg, device, model.sizes)
    meta = {"bank_images": len(train), "dataset_name": ds.name, "backbone_source": cfg.backbone,
            "bank_fitted_patches": fitted, **model.settings()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_knn_model(path, model, applied.to_dict(), meta)
    write_json(path.parent / "config.json", applied.to_dict())
    log.info("kNN model: block %d of %s, banks %s of %s patches (%s) at sizes %s from %d images -> %s", layer,
             cfg.backbone, meta["bank_patches"], fitted, ecfg.knn_bank_dtype, meta["sizes"], len(train), path)
    return path


__all__ = ["KNN_FORMAT", "KNN_DIR", "DEFAULT_LAYER", "KnnDetector", "truncated_backbone", "save_knn_model",
           "load_knn_model", "checkpoint_format", "load_model", "model_kind", "run_sizes", "knn_model_path",
           "applied_config", "evaluated_config", "fit_changes", "fit_knn_model", "FIT_KEYS", "FIT_KEYS_SINCE"]
