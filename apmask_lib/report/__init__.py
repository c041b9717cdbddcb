"""What finished runs hand on: a run's plottable results for DVC (``collect``), Tables 1-4 ours beside the
paper's (``tables``), the paper's published numbers (``reference``, from ``paper_tables.csv``)."""
