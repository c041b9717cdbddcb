"""What every stage stands on, knowing nothing of the method: files (atomic writes, JSON, checkpoints),
the result files of evaluation and prediction (``outputs``), devices, random number generators, the
pinned numerics (``repro``), execution options that change no number (``fastpath``), a run's config
fingerprint, stopping on NaN/inf, the machine line, the optimiser set-up. Modules are imported explicitly."""
