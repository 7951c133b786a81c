"""Train: iterative magnitude pruning inside ``Trainer.fit`` (:mod:`.imp`), the masks it keeps (:mod:`.masks`),
and reading the level checkpoints it writes (:mod:`.checkpoints`).

Submodules are imported on use; this package imports nothing itself.
"""
