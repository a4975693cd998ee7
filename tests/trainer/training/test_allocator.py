"""trainer/training/allocator.py: the malloc settings reach the processes that need them, and a value the
user set wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.training import allocator

ROOT = Path(__file__).resolve().parents[3]


def test_env_vars_leave_what_is_already_set() -> None:
    assert allocator.env_vars({}) == dict(allocator.ENV_VARS)
    chosen = allocator.env_vars({"MALLOC_MMAP_THRESHOLD_": "65536"})
    assert "MALLOC_MMAP_THRESHOLD_" not in chosen and chosen["MALLOC_TRIM_THRESHOLD_"] == str(1 << 30)


def test_describe_names_the_settings_of_this_process(monkeypatch: Any) -> None:
    for name in allocator.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    assert allocator.describe() == "glibc defaults"
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "7")
    assert allocator.describe() == "MALLOC_TRIM_THRESHOLD_=7"


def test_reexec_starts_the_program_again_with_the_settings() -> None:
    probe = ("import json, os, sys; from trainer.training import allocator; allocator.reexec_configured(); "
             "print(json.dumps({'argv': sys.argv[1:], 'env': {k: os.environ.get(k) for k in allocator.ENV_VARS}}))")
    env = {k: v for k, v in os.environ.items() if k not in allocator.ENV_VARS}
    env["MALLOC_TRIM_THRESHOLD_"] = "12345"  # the user's value is kept
    result = subprocess.run([sys.executable, "-c", probe, "--flag"], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=True, timeout=60)
    seen = json.loads(result.stdout)
    assert seen["argv"] == ["--flag"]
    assert seen["env"] == {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": "12345"}
