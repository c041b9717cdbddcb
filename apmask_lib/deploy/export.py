"""Export a fine-tuned detector (or the kNN model of ``apmask fit --method knn``) for deployment: ONNX
or TorchScript, multi-scale averaging inside.

``export_detector(model_path, out, fmt)`` writes one file whose graph takes

  images  float32 (B, 3, H, W), RGB in [0, 1] (any H, W; one size per batch)

and returns

  score   float32 (B,)        mean over the test scales of P(anomalous) (``det_mean``, evaluation's default score)
  map     float32 (B, H, W)   mean over the scales of the per-pixel anomaly probability, at the input size
  probs   float32 (B, S)      P(anomalous) at each scale (the paper's majority vote: ``(probs > 0.5).sum(1) >= S / 2``)

Inside, the batch is resized bilinearly (no anti-aliasing: ONNX's exporter has no anti-aliased
resize) to each scale, passed through the detector, and the maps are resized back to (H, W) and
averaged -- :func:`apmask_lib.inference.multiscale.predict_multiscale`'s maths, except that apmask resizes the
uint8 image with OpenCV (area when shrinking, cubic when enlarging). So, to stay close to apmask,
shrink a large image to about the largest scale with ``cv2.INTER_AREA`` first (docs/own-data.md,
"Deploying without apmask"); tests/test_export.py measures both differences on real images.

The kNN model (:mod:`apmask_lib.knn.model`) is exported through the same graph: its memory banks are
constants of the file, the nearest-neighbour distance one matrix product and a max over the bank;
its outputs are the kNN distances halved (``<file>.json`` says so), at the model's own sizes.

Beside the file, ``<file>.json`` records the scales, the input/output contract and the decision
threshold (``threshold.json`` from ``apmask evaluate`` when found, :mod:`apmask_lib.evaluate.threshold`); the
ONNX file also carries them as metadata (``apmask.*`` keys).
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EvaluateConfig
from ..knn.model import load_model, model_kind, run_sizes
from ..evaluate.threshold import find_threshold_file, read_threshold
from ..core.files import atomic_write_text

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18


class MultiScaleDetector(nn.Module):
    """The exported graph (module docstring): detector + resizing + averaging over ``sizes``."""

    def __init__(self, detector: nn.Module, sizes: Sequence[int]):
        super().__init__()
        self.detector = detector.eval()
        self.sizes = tuple(int(s) for s in sizes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, W = images.shape[-2], images.shape[-1]
        probs = []
        total = None
        for s in self.sizes:
            x = F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False)
            out = self.detector(x)
            probs.append(torch.sigmoid(out.logit))
            m = F.interpolate(torch.sigmoid(out.seg_logits)[:, None], size=(H, W), mode="bilinear",
                              align_corners=False)[:, 0]
            total = m if total is None else total + m
        p = torch.stack(probs, dim=1)
        return p.mean(dim=1), total / len(self.sizes), p


def export_detector(model_path: str | Path, out: str | Path, fmt: str = "onnx",
                    scales: Sequence[int] = EvaluateConfig().scales, threshold: str | Path | None = None,
                    example_size: int = 256, force: bool = False) -> Path:
    """Write the detector at ``model_path`` as ``fmt`` (onnx | torchscript) to ``out`` plus
    ``out.json`` (module docstring); returns ``out``. ``threshold``: a ``threshold.json`` (default: the
    one ``apmask evaluate`` wrote for this model, if any). Refuses to overwrite ``out`` without ``force``."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose another --out or pass --force to replace it")
    model = load_model(model_path, map_location="cpu")   # detector or kNN model; refuses non-finite weights
    kind = model_kind(model)
    sizes = run_sizes(model, scales)
    graph = MultiScaleDetector(model, sizes).eval()
    thr_path = Path(threshold) if threshold is not None else find_threshold_file(model_path, kind)
    thr = read_threshold(thr_path) if thr_path is not None else None
    if thr is None:
        log.warning("no threshold.json for %s: the export carries no decision threshold (run apmask evaluate)",
                    model_path)
    info: dict[str, Any] = {
        "format": fmt, "model": str(model_path), "sizes": list(sizes),
        "input": {"images": "float32 (B, 3, H, W), RGB in [0, 1]"},
        "outputs": {"score": "float32 (B,) mean P(anomalous) over sizes (det_mean)",
                    "map": "float32 (B, H, W) mean anomaly probability at the input size",
                    "probs": "float32 (B, S) P(anomalous) per size"},
        "threshold": thr, "threshold_file": str(thr_path) if thr_path else None,
        "resize": "bilinear inside the graph, no anti-aliasing; shrink large images with cv2.INTER_AREA first",
    }
    if kind == "knn":   # the kNN model (apmask_lib/knn/model.py): distances / 2 where the detector has probabilities
        info.update(model_kind="knn", knn=model.settings(), outputs={
            "score": "float32 (B,) mean over sizes of (kNN image score / 2): mean of the top 1 % patch cosine "
                     "distances to the memory bank, halved into [0, 1]",
            "map": "float32 (B, H, W) mean over sizes of (kNN distance map / 2) at the input size",
            "probs": "float32 (B, S) kNN image score / 2 per size (not a probability)"})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    example = torch.rand(1, 3, example_size, example_size)
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(graph, example, tmp, info)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # tracer warnings (constant sizes), torch.jit deprecation
                traced = torch.jit.trace(graph, (example,), check_trace=False)
            traced.save(str(tmp), _extra_files={"apmask.json": json.dumps(info)})
    tmp.replace(out)
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(info, indent=2))
    log.info("exported %s -> %s (%s, sizes %s)", model_path, out, fmt, list(sizes))
    return out


def _export_onnx(graph: nn.Module, example: torch.Tensor, path: Path, info: dict[str, Any]) -> None:
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # tracer warnings about Python shape arithmetic (constant sizes)
        torch.onnx.export(graph, (example,), str(path), input_names=["images"], output_names=["score", "map", "probs"],
                          dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "score": {0: "batch"},
                                        "map": {0: "batch", 1: "height", 2: "width"}, "probs": {0: "batch"}},
                          opset_version=ONNX_OPSET, dynamo=False)
    m = onnx.load(str(path))
    for k, v in (("apmask.sizes", json.dumps(info["sizes"])), ("apmask.threshold", json.dumps(info["threshold"])),
                 ("apmask.outputs", json.dumps(info["outputs"]))):
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, str(path))


def run_onnx(path: str | Path, images: "Any") -> tuple[Any, Any, Any]:
    """(score, map, probs) of an exported ONNX file on a float32 (B, 3, H, W) numpy batch (onnxruntime, CPU)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return tuple(sess.run(None, {"images": images}))


__all__ = ["FORMATS", "MultiScaleDetector", "export_detector", "run_onnx"]
