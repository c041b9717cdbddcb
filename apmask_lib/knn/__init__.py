"""The kNN extension (NOT part of the paper): patch-level nearest-neighbour scoring (``scoring``), its
fusion with the detector inside evaluation (``fusion``), and the kNN model of its own, ``apmask fit
--method knn`` (``model``)."""
