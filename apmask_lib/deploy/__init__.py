"""Using a fine-tuned model: scoring your own images (``predict``) and exporting it to ONNX /
TorchScript (``export``)."""
