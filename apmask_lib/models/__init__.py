"""Torch models: the ViT backbone, the projection heads and the anomaly detector. No training loops,
no files: weights are read and written by :mod:`apmask_lib.weights`."""
from .detector import AnomalyDetector, DetectorOutput
from .vit import ARCHS, IMAGENET_MEAN, IMAGENET_STD, ViTConfig, ViTOutput, VisionTransformer

__all__ = ["ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "ViTConfig", "ViTOutput", "VisionTransformer",
           "AnomalyDetector", "DetectorOutput"]
