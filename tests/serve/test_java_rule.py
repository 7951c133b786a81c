"""The serve tests' Java rule (tests/java_rule.py): skip with the reason without Java, fail under CI=true."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path


from java_rule import java_rule


def _fake_java(bin_dir: Path, version: str) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    java = bin_dir / "java"
    java.write_text(f"#!/bin/sh\necho 'openjdk version \"{version}\" 2024-01-16' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IXUSR)


def test_no_java_on_path_skips_with_the_reason(tmp_path):
    rule = java_rule({"PATH": str(tmp_path)})
    assert rule is not None and rule[0] == "skip"
    assert "`java` is not on PATH" in rule[1] and "openjdk-17-jre-headless" in rule[1]


def test_no_java_under_ci_fails(tmp_path):
    for ci in ("true", "TRUE", " true"):
        rule = java_rule({"PATH": str(tmp_path), "CI": ci})
        assert rule is not None and rule[0] == "fail" and "CI=true" in rule[1], ci
    assert java_rule({"PATH": str(tmp_path), "CI": "false"})[0] == "skip"


def test_java_home_without_java_and_an_old_java_are_missing_java(tmp_path):
    rule = java_rule({"JAVA_HOME": str(tmp_path / "jdk"), "PATH": os.environ.get("PATH", "")})
    assert rule is not None and rule[0] == "skip" and "has no bin/java" in rule[1]
    _fake_java(tmp_path / "old" / "bin", "11.0.2")
    rule = java_rule({"JAVA_HOME": str(tmp_path / "old"), "CI": "true"})
    assert rule is not None and rule[0] == "fail" and "Java 11" in rule[1]


def test_a_java_17_passes_in_and_out_of_ci(tmp_path):
    _fake_java(tmp_path / "bin", "17.0.10")
    assert java_rule({"PATH": str(tmp_path / "bin")}) is None
    assert java_rule({"JAVA_HOME": str(tmp_path), "CI": "true"}) is None


def test_conftest_skips_serve_tests_without_java_and_fails_them_under_ci(tmp_path):
    """The hook in tests/conftest.py, end to end: an inner pytest run with no Java on PATH."""
    tests = Path(__file__).resolve().parents[1]
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text((tests / "conftest.py").read_text())
    (inner / "test_inner.py").write_text(
        "import pytest\n\n@pytest.mark.serve\ndef test_needs_java():\n    pass\n\ndef test_plain():\n    pass\n")
    no_java = tmp_path / "empty_bin"
    no_java.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("JAVA_HOME", "CI")}
    env.update(PATH=str(no_java), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPATH=os.pathsep.join([str(tests), env.get("PYTHONPATH", "")]))

    def run(**extra):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider",
                               "--rootdir", str(inner), str(inner)], capture_output=True, text=True,
                              env={**env, **extra}, cwd=inner, timeout=120)

    proc = run()
    assert re.search(r"\b1 passed, 1 skipped\b", proc.stdout), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "TorchServe needs Java 17" in proc.stdout and "not on PATH" in proc.stdout
    proc = run(CI="true")
    assert re.search(r"\b1 passed\b.*\b1 error\b", proc.stdout), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "CI=true" in proc.stdout
