"""TorchServe glue that runs without Java: config, URL allow-list, request bodies, log parsing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dnnshifter_lightning.serve.defaults import MAX_REQUEST_BYTES
from dnnshifter_lightning.serve.torchserve import (
    JavaMissingError, ServingError, TorchServeServer, check_java, json_bodies, read_log_events, read_switches,
)


def test_a_jdk_less_java_home_says_how_to_install_java(tmp_path, monkeypatch):
    monkeypatch.setenv("JAVA_HOME", str(tmp_path))
    with pytest.raises(JavaMissingError) as info:
        check_java()
    lines = str(info.value).splitlines()
    assert lines[0].startswith(f"JAVA_HOME={tmp_path} has no bin/java")
    assert lines[1] == "TorchServe 0.12 needs Java 17 (a JRE is enough). Install it with one of:"
    assert issubclass(JavaMissingError, ServingError)


def test_config_properties_and_allowed_urls(tmp_path):
    ts = TorchServeServer(tmp_path, ["digits"], ports={"inference": 18080})
    try:
        assert (ts.models, ts.inference_url, ts.inference_headers()) == (
            {"digits": "digits.mar"}, "http://127.0.0.1:18080", {})
        props = ts.config_properties().splitlines()
        for line in ("load_models=digits=digits.mar", "enable_model_api=false",
                     "disable_token_authorization=false", f"max_request_size={MAX_REQUEST_BYTES}"):
            assert line in props
    finally:
        ts.stop()  # never started: this only removes its temporary directories
    ts = TorchServeServer(Path("/srv/models"))
    try:
        pattern = ts.allowed_urls()
        urls = ("file:///srv/models/digits.mar", "file:///tmp/evil.mar", "file:///srv/models/../evil.mar",
                "http://x/digits.mar")
        assert [bool(re.fullmatch(pattern, u)) for u in urls] == [True, False, False, False]
    finally:
        ts.stop()


def test_json_bodies_one_per_sample():
    assert json_bodies(torch.tensor([[[0.5, 1.0]], [[0.0, -1.0]]])) == [b'{"data": [[0.5, 1.0]]}',
                                                                        b'{"data": [[0.0, -1.0]]}']


def test_log_events_skip_broken_and_unrelated_lines(tmp_path):
    ts = TorchServeServer(tmp_path)  # not started: only its log dir is read
    try:
        ts.log_dir.mkdir(parents=True)
        (ts.log_dir / "model_log.log").write_text(
            'x DNNSHIFTER_MEMORY {"total_bytes": 8}\n'
            'x DNNSHIFTER_MEMORY {broken\n'
            'INFO DNNSHIFTER_SWITCH {"from": "level_00", "to": "level_08", "reason": "burst", '
            '"switch_ms": 1.2, "time": 1700000000.0}\n'
            'INFO an unrelated line\n')
        assert read_log_events(ts, "DNNSHIFTER_MEMORY") == [{"total_bytes": 8}]
        assert [(s["from"], s["to"], s["reason"]) for s in read_switches(ts)] == [("level_00", "level_08", "burst")]
    finally:
        ts.stop()
