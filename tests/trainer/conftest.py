"""Fixtures shared by the trainer tests.

* ``data`` and ``models`` (evaluation tests: evaluator/test_checkpoint_eval.py,
  evaluator/test_actor.py, inference/test_retrieval.py, test_explain.py ...): module-scoped, each
  test module builds its tiny splits and models once (a few seconds); a module that defines a
  fixture of the same name (or a parameter, as evaluation/test_recall.py's ``models``) uses its own.
* ``pictures``: a synthetic split with boxes and drawn images (explain, qualitative tests).
* ``cli``: a CLI's ``main`` called in this process (faster than a subprocess per call).
* ``launches``: the `Launch` subprocesses a test started, killed at its end if still running.

``embedded_default_run`` (the embedded default trained once per session, watched by Prometheus)
is in tests/conftest.py: the monitoring tests use it too.
"""

from __future__ import annotations

import importlib
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from eval_run_helpers import (
    EvalData,
    PictureSplit,
    build_eval_data,
    ranked_models,
    write_picture_split,
)
from train_run_helpers import Launch

from model.vsrn import VSRN


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    """Tiny dev (30 images) and test (40 images) shards and their vocabulary."""
    return build_eval_data(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="module")
def models(data: EvalData) -> list[VSRN]:
    """Two tiny models, the one with the higher dev rsum first (eval_run_helpers.ranked_models)."""
    return ranked_models(data)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> PictureSplit:
    """15 synthetic test images with boxes, sizes and drawn pictures, and their vocabulary."""
    return write_picture_split(tmp_path_factory.mktemp("pictures"), images=15)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Any:
    """`cli(script, *args)`: the CLI's main in this process, as a CompletedProcess."""

    def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
        module = importlib.import_module(f"trainer.{script.removesuffix('.py')}")
        try:
            code = module.main(list(args))
        except SystemExit as exit_:  # argparse's usage errors
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], code, captured.out, captured.err)

    return run


@pytest.fixture
def launches() -> Iterator[list[Launch]]:
    """Launches a test started; any still running at its end is killed."""
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.kill()
