"""APMask pre-training (paper Sec. 3.1): the stage (``stage``: ``run_pretrain``), which patch tokens a
student view keeps (``masking``, Eq. 2-4), DINO multi-crop (``multicrop``), the SwAV objective with
Sinkhorn-Knopp codes (``sinkhorn``, Eq. 1), collapse diagnostics (``collapse``)."""
