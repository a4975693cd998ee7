"""Tests of trainer/training/placement.py: a run's bundles against the nodes' resources (the
driver's wait and its one line: tests/trainer/test_launch.py)."""

from __future__ import annotations

from train_run_helpers import ROOT

from trainer.config import load_config
from trainer.training.placement import run_bundles, unplaceable


def test_bundles_are_placed_on_the_nodes_total_resources() -> None:
    config = load_config(ROOT / "configs" / "coco.yaml", ["distributed.workers=2"])
    bundles = run_bundles(config)
    assert [name for name, _ in bundles] == ["training worker 0", "training worker 1", "evaluation actor"]
    assert bundles[0][1] == {"CPU": 8.0, "GPU": 1.0} and bundles[-1][1] == {"CPU": 4.0, "GPU": 1.0}
    gpu_node = {"CPU": 32.0, "GPU": 2.0, "memory": 1e11}
    assert unplaceable(bundles, [gpu_node, gpu_node]) == []
    # One node of 2 GPUs: the evaluator's GPU is missing (the largest bundles are placed first).
    assert [name for name, _ in unplaceable(bundles, [gpu_node])] == ["evaluation actor"]
    # CPU nodes only: nothing that asks for a GPU fits, however many CPUs there are.
    assert len(unplaceable(bundles, [{"CPU": 64.0}] * 4)) == 3
    # A bundle must fit on ONE node: two half-full nodes do not hold a whole worker.
    assert len(unplaceable(bundles[:1], [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}])) == 1
