"""The Java rule for the tests that start a real TorchServe (marked ``serve``).

Without Java 17 those tests are skipped with the reason (``check_java``'s message: what is missing and
how to install it), except under ``CI=true``, where a missing Java fails them: CI must run them.
"""

from __future__ import annotations

import os
from typing import Mapping

from dnnshifter_lightning.serve.torchserve import JavaMissingError, check_java


def java_rule(env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``None`` when a usable Java is there, else ``("skip" | "fail", why)``; ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    try:
        check_java(env)
    except JavaMissingError as exc:
        under_ci = env.get("CI", "").strip().lower() == "true"
        why = f"TorchServe needs Java 17 and none is usable: {exc}"
        if under_ci:
            why += "\n(CI=true: the TorchServe tests must run there, so a missing Java fails them)"
        return ("fail" if under_ci else "skip", why)
    return None
