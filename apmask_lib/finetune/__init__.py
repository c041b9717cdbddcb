"""Fine-tuning on synthetic anomalies (paper Sec. 3.2): the stage (``stage``: ``run_finetune``), the
synthetic anomalies (``anomalies``), the batches built from them (``batches``), the losses (``losses``),
the label-free validation signal (``validation``)."""
