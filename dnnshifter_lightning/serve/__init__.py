"""Serve: the runtime that hosts a portfolio (:mod:`.runtime`), the load policy (:mod:`.policy`), the served
set (:mod:`.served`), request handling shared by both engines (:mod:`.core`, :mod:`.images`), and the two
engines' adapters: TorchServe (:mod:`.handler`, the worker code; :mod:`.torchserve`, everything outside
the worker) and LitServe (:mod:`.litserve`; its Prometheus metrics, :mod:`.litserve_metrics`; and
``dnnshifter litserve``, :mod:`.litserve_command`).

Submodules are imported on use; this package imports nothing itself (the core never pulls in a server).
"""
