"""Fixtures shared by the evaluation tests (test_checkpoint_eval.py, test_eval_worker.py).

Both are module-scoped: each test module builds its tiny splits and models once (a few seconds);
a module that defines a fixture of the same name (or a parameter, as test_evaluation.py's
``models``) uses its own.
"""

from __future__ import annotations

import pytest
from eval_run_helpers import EvalData, build_eval_data, ranked_models

from model.vsrn import VSRN


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    """Tiny dev (30 images) and test (40 images) shards and their vocabulary."""
    return build_eval_data(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="module")
def models(data: EvalData) -> list[VSRN]:
    """Two tiny models, the one with the higher dev rsum first (eval_run_helpers.ranked_models)."""
    return ranked_models(data)
