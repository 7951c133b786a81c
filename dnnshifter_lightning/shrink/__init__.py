"""Shrink: exact structural pruning of sparse checkpoints (:mod:`.structured`, :mod:`._surgery`), their
measurement (:mod:`.measure`), the portfolio build (:mod:`.build`, plain PyTorch), the Lightning callback
that runs it (:mod:`.callback`), its console output (:mod:`.report`) and ``portfolio.png`` (:mod:`.plot`).

Submodules are imported on use; this package imports nothing itself.
"""
