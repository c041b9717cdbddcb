"""Torch models: the ViT backbone and the small heads on top. No training loops, no files."""
from .vit import ARCHS, IMAGENET_MEAN, IMAGENET_STD, ViTConfig, ViTOutput, VisionTransformer
from .weights import BackboneUnavailable, build_backbone

__all__ = ["ARCHS", "IMAGENET_MEAN", "IMAGENET_STD", "ViTConfig", "ViTOutput", "VisionTransformer",
           "BackboneUnavailable", "build_backbone"]
