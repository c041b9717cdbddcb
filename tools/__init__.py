"""Project tools that are not part of the library (so editing them never re-runs the DVC pipeline).

``python -m tools.docs``: regenerate the generated blocks of README.md and docs/ from results/ and
apmask_lib/config.py (``--check``: fail when a committed block is stale; tests/test_docs_numbers.py).
"""
