"""Where weights come from and where they go: backbone sources chosen by one string (the hub, a
file, the offline DINOv2 converted from ONNX, random), the conversion's cache, and the fine-tuned
detector's checkpoint. Everything here touches files, the environment or the network;
``apmask_lib.models`` holds the torch modules only.

Layers: ``dinov2_onnx`` (conversion + cache) <- ``backbones`` (``build_backbone``) <- ``checkpoint``
(``save_detector`` / ``load_detector``); none imports a later one."""
from .backbones import BackboneUnavailable, build_backbone
from .checkpoint import FORMAT, check_finite_weights, load_detector, read_detector_checkpoint, save_detector

__all__ = ["BackboneUnavailable", "build_backbone", "FORMAT", "check_finite_weights", "load_detector",
           "read_detector_checkpoint", "save_detector"]
