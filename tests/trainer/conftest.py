"""Fixtures shared by the trainer tests.

* ``data`` and ``models`` (evaluation tests: evaluator/test_checkpoint_eval.py,
  evaluator/test_actor.py, inference/test_retrieval.py, test_explain.py ...): module-scoped, each
  test module builds its tiny splits and models once (a few seconds); a module that defines a
  fixture of the same name (or a parameter, as evaluation/test_recall.py's ``models``) uses its own.
* ``pictures``: a synthetic split with boxes and drawn images (explain, qualitative tests).
* ``cli``: a CLI's ``main`` called in this process (faster than a subprocess per call).
* ``embedded_default_run`` (session): the embedded default trained once through the launcher.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
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

ROOT = Path(__file__).resolve().parents[2]


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


@dataclasses.dataclass(frozen=True)
class EmbeddedRun:
    """The embedded default trained through the real launcher (see `embedded_default_run`)."""

    result: subprocess.CompletedProcess[str]  # the launcher's exit status, stdout and stderr
    run_dir: Path
    cache_dir: Path  # data.cache_dir: the synthetic dataset (shards/, images/, vocab.json)

    @property
    def synthetic(self) -> Path:
        [directory] = self.cache_dir.glob("synthetic-*")
        return directory


@pytest.fixture(scope="session")
def embedded_default_run(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> EmbeddedRun:
    """`python trainer/launch.py` on the embedded default (configs/tiny.yaml, what `make run` runs),
    trained once per session (about 3 minutes on 2 cores) for the tests that need a trained run:
    tests/trainer/test_launch.py (the main job) and test_trained_interpretation.py.

    Only where it runs differs from `make run`: the data cache and run directory are temporary, and
    the job attaches to the session's Ray (2 CPUs) through RAY_ADDRESS, as under `ray job submit`,
    with 2 workers x 0.75 CPU beside the evaluator's 0.5 CPU (resources, not numerics).
    """
    root = tmp_path_factory.mktemp("embedded_default")
    address = ray_local.get_runtime_context().gcs_address
    result = subprocess.run(
        [sys.executable, "trainer/launch.py", "--set", f"data.cache_dir={root / 'cache'}",
         "--set", f"checkpoint.storage_path={root / 'runs'}", "--set", "checkpoint.run_name=embedded",
         "--set", "distributed.cpus_per_worker=0.75"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=900,
        env={**os.environ, "RAY_ADDRESS": address})
    return EmbeddedRun(result=result, run_dir=root / "runs" / "embedded", cache_dir=root / "cache")


@pytest.fixture
def launches() -> Iterator[list[Launch]]:
    """Launches a test started; any still running at its end is killed."""
    started: list[Launch] = []
    yield started
    for launch in started:
        launch.kill()
