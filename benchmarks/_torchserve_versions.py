"""Contender (b) of bench_switching: TorchServe's own model versions.

Every variant becomes its own archive of one model name with its own version (a one-variant
portfolio served by the same handler). A switch is what a TorchServe operator would do: register the
variant's version (``POST /models?url=...&synchronous=true``, which starts its worker) and make it
the default (``PUT /models/NAME/VERSION/set-default``). The old version is then unregistered (timed
separately) so that memory stays bounded and the next round can register it again.

Returns ``{"skipped": reason}`` when Java or TorchServe is unavailable or the server fails.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = "bench"


def _worker_rss_bytes(java_pid: int | None) -> int:
    """Resident memory of TorchServe's Python workers (processes running model_service_worker)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"model_service_worker" not in cmd:
                continue
            status = Path(f"/proc/{pid}/status").read_text()
            ppid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))
            if java_pid is not None and ppid != java_pid:
                continue
            total += int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:"))) * 1024
        except (OSError, StopIteration, ValueError):
            continue
    return total


def _archive(variant: dict[str, Any], portfolio: Path, manifest: dict[str, Any], version: str, store: Path,
             work: Path) -> str:
    from dnnshifter_lightning.serve.defaults import default_model_config
    from dnnshifter_lightning.serve.torchserve import HANDLER_FILE, _venv_tool
    import yaml

    stage = work / f"stage_{version}"
    one = stage / "extra" / "portfolio"
    one.mkdir(parents=True)
    shutil.copy2(portfolio / variant["file"], one / Path(variant["file"]).name)
    single = {**manifest, "variants": [{**variant, "file": Path(variant["file"]).name}]}
    (one / "manifest.json").write_text(json.dumps(single, indent=2))
    cfg = stage / "model-config.yaml"
    cfg.write_text(yaml.safe_dump(default_model_config({"handler": {"profile_batch_sizes": [1]}}), sort_keys=False))
    name = f"{MODEL}_v{version.replace('.', '_')}"
    cmd = [_venv_tool("torch-model-archiver"), "--model-name", MODEL, "--version", version,
           "--handler", str(HANDLER_FILE), "--extra-files", str(stage / "extra"), "--config-file", str(cfg),
           "--export-path", str(stage), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, TMPDIR=str(stage)))
    if proc.returncode != 0:
        raise RuntimeError(f"torch-model-archiver failed: {proc.stderr[-2000:]}")
    shutil.move(str(stage / f"{MODEL}.mar"), store / f"{name}.mar")
    return f"{name}.mar"


def measure_versions(portfolio: Path, manifest: dict[str, Any], rounds: int = 2) -> dict[str, Any]:
    """Median seconds to switch to each variant by registering it as a new version + set-default."""
    try:
        from dnnshifter_lightning.serve.torchserve import ServingError, TorchServeServer, check_java
        check_java()
    except Exception as exc:  # noqa: BLE001 - any reason TorchServe cannot run here
        return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    work = Path(tempfile.mkdtemp(prefix="bench-ts-versions-"))
    store = work / "store"
    store.mkdir()
    variants = manifest["variants"]
    try:
        mars = {v["id"]: (_archive(v, portfolio, manifest, f"{i + 1}.0", store, work), f"{i + 1}.0")
                for i, v in enumerate(variants)}
        first = variants[0]["id"]
        # registering versions is what this contender measures, so it opts in to the model API
        server = TorchServeServer(store, {MODEL: mars[first][0]}, workdir=work / "ts", enable_model_api=True)
        times: dict[str, list[float]] = {v["id"]: [] for v in variants}
        unregister: list[float] = []
        rss: dict[str, int] = {}
        body = json.dumps({"data": [[[0.0] * manifest["input_spec"]["shape"][-1]]
                                    * manifest["input_spec"]["shape"][-2]]}).encode()
        with server:
            current = first
            for _ in range(rounds):
                for v in variants[1:] + variants[:1]:
                    vid = v["id"]
                    if vid == current:
                        continue
                    mar, version = mars[vid]
                    t0 = time.perf_counter()
                    status, reply = server.management(
                        "POST", f"/models?url={mar}&initial_workers=1&synchronous=true")
                    if status != 200:
                        raise ServingError(f"register {mar}: {status} {reply[:300]!r}")
                    status, reply = server.management("PUT", f"/models/{MODEL}/{version}/set-default")
                    if status != 200:
                        raise ServingError(f"set-default {version}: {status} {reply[:300]!r}")
                    times[vid].append(time.perf_counter() - t0)
                    rss[vid] = _worker_rss_bytes(server.pid)  # both versions loaded: the switch's peak
                    status, reply = server.predict(MODEL, body)
                    served = json.loads(reply).get("variant") if status == 200 else None
                    if served != vid:
                        raise ServingError(f"after set-default, {served!r} served instead of {vid!r}: {reply[:300]!r}")
                    t1 = time.perf_counter()
                    old_version = mars[current][1]
                    status, reply = server.management("DELETE", f"/models/{MODEL}/{old_version}")
                    if status != 200:
                        raise ServingError(f"unregister {old_version}: {status} {reply[:300]!r}")
                    unregister.append(time.perf_counter() - t1)
                    current = vid
        per_variant = {vid: statistics.median(t) for vid, t in times.items() if t}
        if len(per_variant) < len(variants):  # the first variant is reached once per round too
            missing = [v["id"] for v in variants if v["id"] not in per_variant]
            raise RuntimeError(f"no timing for {missing}")
        return {"per_variant_s": per_variant, "unregister_s_median": statistics.median(unregister),
                "worker_rss_bytes_at_switch": rss, "rounds": rounds,
                "how": "POST /models?url=V.mar&initial_workers=1&synchronous=true, then PUT set-default; "
                       "old version unregistered after (timed separately)"}
    except Exception as exc:  # noqa: BLE001 - report, do not crash the whole benchmark
        return {"skipped": f"TorchServe run failed: {type(exc).__name__}: {str(exc)[:500]}"}
    finally:
        shutil.rmtree(work, ignore_errors=True)
