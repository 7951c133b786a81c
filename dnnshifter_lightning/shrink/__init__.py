"""Shrink: exact structural pruning of sparse checkpoints (:mod:`.structured`, :mod:`._surgery`), their
measurement (:mod:`.measure`) and the portfolio build (:mod:`.build`, :mod:`.plot`).

Submodules are imported on use; this package imports nothing itself.
"""
