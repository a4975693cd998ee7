"""Fixtures of the monitoring tests: the promtool and prometheus binaries.

Both come from Debian's prometheus package (`make test` installs it when it runs as root). The
tests fail, rather than skip, when they are missing: skipped rule tests would let broken alerts
through unnoticed.
"""

from __future__ import annotations

import shutil

import pytest

INSTALL_HINT = ("install Debian's prometheus package (`apt-get install prometheus`; `make test` does it "
                "when run as root)")


def _find_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: {INSTALL_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _find_tool("promtool")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return _find_tool("prometheus")
