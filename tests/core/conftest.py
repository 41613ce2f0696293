"""Markers of the DNM tests."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: end-to-end training runs on real data (deselect with -m 'not e2e')")
