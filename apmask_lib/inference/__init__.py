"""Running a model on test images: multi-scale test-time inference (``multiscale``), shared by the kNN
extension, evaluation and prediction."""
