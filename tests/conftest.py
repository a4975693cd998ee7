"""Shared pytest setup: make the helper modules in tests/ (e.g. reference_layout) importable."""

import sys
from pathlib import Path

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
