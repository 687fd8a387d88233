"""Optional packages (flwr, peft, matplotlib) in tests.

`need("flwr")` imports the package, or skips the calling test (or module) with the package's name
and its requirements file as the reason, so the README's test line passes on a fresh clone with
only requirements.txt. CI's second stage sets LADA_TEST_OPTIONAL=1 after installing the optional
files: there a missing package fails the test instead of skipping it, so none of them is silently
skipped in CI.
"""
import importlib
import os

import pytest

REQUIREMENTS = {"flwr": "requirements-flower.txt", "peft": "requirements-lora.txt", "matplotlib": "requirements-plot.txt"}


def need(name: str):
    """The imported package `name`; a skip naming it when it is missing (a failure under LADA_TEST_OPTIONAL=1)."""
    if os.environ.get("LADA_TEST_OPTIONAL") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"{name} is not installed (pip install -r {REQUIREMENTS[name]})")
