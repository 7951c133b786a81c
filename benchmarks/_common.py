"""Shared benchmark plumbing: machine description, JSON results, and the README tables.

Each benchmark writes ``benchmarks/results/<name>.json`` and, with ``--readme``, replaces the block
between ``<!-- bench:<name> -->`` and ``<!-- /bench:<name> -->`` in README.md with its table.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine() -> dict[str, Any]:
    """Where the figures came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": dt.date.today().isoformat(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
    }


def machine_line(m: dict[str, Any]) -> str:
    where = f"{m['cpu_count']} CPU cores ({m['cpu']})" + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")
    return f"{m['date']}, {where}, torch {m['torch']}, Python {m['python']}"


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def write_json(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def update_readme(name: str, markdown: str, readme: Path = ROOT / "README.md") -> bool:
    """Replace the README block for ``name``; returns False when the markers are missing."""
    text = readme.read_text()
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: f"{start}\n{markdown.strip()}\n{end}", text))
    return True
