"""Evaluation of a fine-tuned model on the test split: the stage (``stage``: ``run_evaluate``), the
decision thresholds a user acts on (``threshold``), a training-free probe of a backbone (``probe``)."""
