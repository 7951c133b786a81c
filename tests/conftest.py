import functools
import sys
from pathlib import Path

# Test helper modules (imp_helpers, serve_fixtures, java_rule, ...) live here; the tests, in subfolders
# that mirror the package (train/, shrink/, serve/, demo/), import them by name.
sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def portfolio(tmp_path_factory) -> Path:
    """The real-server tests' portfolio (test_serve, test_litserve): a ladder, every variant on the front.
    Modules that need another portfolio define their own ``portfolio`` fixture, which overrides this one."""
    from serve_fixtures import LADDER_ACCURACIES, build_test_portfolio

    path = tmp_path_factory.mktemp("portfolio")
    build_test_portfolio(path, accuracies=LADDER_ACCURACIES)
    return path


@functools.lru_cache(maxsize=None)
def _java_rule() -> tuple[str, str] | None:
    from java_rule import java_rule

    return java_rule()


def pytest_runtest_setup(item):
    """Tests that start a real TorchServe (marked ``serve``): skipped without Java, failed under CI=true."""
    if item.get_closest_marker("serve") is not None:
        rule = _java_rule()
        if rule is not None:
            action, why = rule
            (pytest.fail if action == "fail" else pytest.skip)(why)
