"""apmask: self-supervised anomaly detection and localisation with attention-conditioned
augmentations (Bozorgtabar & Mahapatra, AAAI 2023)."""
__version__ = "0.1.0"
