"""Demo: the embedded workloads (:mod:`.digits`, :mod:`.models`) ``dnnshifter demo`` (:mod:`.run`)
and its serving step on TorchServe or LitServe (:mod:`.serving`).

Submodules are imported on use; this package imports nothing itself.
"""
