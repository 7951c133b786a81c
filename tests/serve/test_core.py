"""Options and request parsing shared by both engines (serve/core.py, serve/defaults.py)."""

from __future__ import annotations

import pytest

from dnnshifter_lightning.serve.core import RequestParser, check_options, default_options, read_options_file
from dnnshifter_lightning.serve.defaults import default_model_config


def test_check_options_names_the_unknown_or_bad_option():
    check_options({"slo_ms": 50, "memory_budget_mb": 64})
    with pytest.raises(ValueError, match=r"^unknown option 'slo'; known options: batch_timeout, fixed_variant, .*variants$"):
        check_options({"slo": 50})
    with pytest.raises(ValueError, match=r"^memory_budget_mb must be a number > 0 or null \(no cache\), got -1$"):
        check_options({"memory_budget_mb": -1})


def test_read_options_file_reads_yaml_and_refuses_a_misspelt_policy_option(tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("slo_ms: 40\npolicy:\n  high_utilisation: 0.9\n")
    assert read_options_file(cfg) == {"slo_ms": 40, "policy": {"high_utilisation": 0.9}}
    cfg.write_text("policy:\n  high_utilisaton: 0.9\n")
    with pytest.raises(ValueError, match=r"my.yaml: unknown policy option\(s\) \['high_utilisaton'\]; known options"):
        read_options_file(cfg)


def test_request_parser_refuses_non_finite_data_and_unsupported_images():
    parser = RequestParser({"shape": [1, 2, 2]}, default_options())
    assert parser.parse(b'{"data": [[[0, 1], [2, NaN]]]}') == {"status": 400, "error": "data contains NaN or infinity"}
    assert parser.parse(b"GIF89a...")["status"] == 415


def test_default_model_config_takes_overrides():
    config = default_model_config({"batchSize": 4, "handler": {"slo_ms": 20}})
    assert config["batchSize"] == 4 and config["handler"]["slo_ms"] == 20
