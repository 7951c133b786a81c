"""Demo: the embedded workloads (:mod:`.digits`, :mod:`.models`) and ``dnnshifter demo`` (:mod:`.run`).

Submodules are imported on use; this package imports nothing itself.
"""
