"""What a run asks of the Ray cluster, and waiting until the cluster can hold it (trainer/launch.py).

A run places one bundle per training worker (distributed.cpus_per_worker, and
distributed.gpus_per_worker with use_gpu) and one for the evaluation actor (eval.cpus, eval.gpus).
Without a check, a run asking for GPUs on a cluster that has none waits silently forever (Ray
Train's placement group stays pending); `wait_for_resources` hands the bundles to the autoscaler,
if the cluster has one, and ends with one line naming what is missing after
distributed.resource_wait_s.
"""

from __future__ import annotations

import logging
import time

from trainer.config import TrainConfig

log = logging.getLogger(__name__)


class ClusterResourcesError(RuntimeError):
    """The Ray cluster cannot place the run's workers and evaluation actor; the message names what
    is missing."""


def run_bundles(config: TrainConfig) -> list[tuple[str, dict[str, float]]]:
    """(what, Ray resources) of every actor the run places: each training worker, the evaluator."""
    dist = config.distributed
    worker = {"CPU": dist.cpus_per_worker, **({"GPU": dist.gpus_per_worker} if dist.use_gpu else {})}
    bundles = [(f"training worker {rank}", worker) for rank in range(dist.workers)]
    if config.eval.enabled:
        evaluator = {"CPU": config.eval.cpus, **({"GPU": config.eval.gpus} if config.eval.gpus else {})}
        bundles.append(("evaluation actor", {k: v for k, v in evaluator.items() if v}))
    return bundles


def unplaceable(bundles: list[tuple[str, dict[str, float]]],
                nodes: list[dict[str, float]]) -> list[tuple[str, dict[str, float]]]:
    """The bundles that do not fit on the nodes' TOTAL resources (what the cluster has, busy or
    not), placed largest first, each on the first node with room. Greedy: a fit it reports is a
    real one; a miss may in rare packings be a fit that Ray's scheduler would find."""
    free = [dict(node) for node in nodes]
    left = []
    for name, need in sorted(bundles, key=lambda b: (-b[1].get("GPU", 0.0), -b[1].get("CPU", 0.0))):
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items())), None)
        if node is None:
            left.append((name, need))
            continue
        for key, value in need.items():
            node[key] = node.get(key, 0.0) - value
    return left


def _format_resources(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{key}: {value:g}" for key, value in sorted(resources.items())) + "}"


def describe_missing(config: TrainConfig, missing: list[tuple[str, dict[str, float]]],
                     nodes: list[dict[str, float]], waited_s: float) -> str:
    """One line: what the run asks for (with the keys that set it), what the nodes have, what is missing."""
    bundles = run_bundles(config)
    have = {key: sum(node.get(key, 0.0) for node in nodes) for key in ("CPU", "GPU")}
    needed: dict[str, float] = {}
    for _, need in bundles:
        for key, value in need.items():
            needed[key] = needed.get(key, 0.0) + value
    shortfall = {key: value - have.get(key, 0.0) for key, value in needed.items() if value > have.get(key, 0.0) + 1e-9}
    names = ", ".join(name for name, _ in missing)
    lacking = (f"missing {_format_resources(shortfall)} (for {names})" if shortfall
               else f"no node has room for {names} (a bundle must fit on one node)")
    dist = config.distributed
    asked = (f"{dist.workers} training worker(s) x {_format_resources(bundles[0][1])} (distributed.workers, "
             f"distributed.cpus_per_worker{', distributed.gpus_per_worker' if dist.use_gpu else ''})")
    if config.eval.enabled:
        asked += f" and the evaluation actor {_format_resources(bundles[-1][1])} (eval.cpus, eval.gpus)"
    return (f"the Ray cluster cannot place this run: it asks for {asked}; its {len(nodes)} node(s) have "
            f"{_format_resources(have)} in all; {lacking}, after waiting {waited_s:.0f} s "
            "(distributed.resource_wait_s) for nodes to join. Add nodes with these resources or ask for fewer "
            "(on a cluster without GPUs: distributed.use_gpu=false)")


def wait_for_resources(config: TrainConfig, poll_s: float = 1.0) -> None:
    """Return once the cluster's nodes can hold the run's bundles; raise ClusterResourcesError
    naming what is missing after distributed.resource_wait_s.

    Without this, a run asking for GPUs on a cluster that has none waits silently forever: Ray
    Train's placement group stays pending. The bundles are also handed to the autoscaler
    (ray.autoscaler.sdk.request_resources, a hint that is a no-op without one) so that an
    autoscaling cluster starts nodes for them while this waits; the request is cleared once they
    fit, since Ray Train's placement group then holds the demand.
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    bundles = run_bundles(config)
    started = time.monotonic()
    requested = False
    try:
        while True:
            nodes = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
            missing = unplaceable(bundles, nodes)
            waited = time.monotonic() - started
            if not missing:
                return
            if waited >= config.distributed.resource_wait_s:
                raise ClusterResourcesError(describe_missing(config, missing, nodes, waited))
            if not requested:
                request_resources(bundles=[need for _, need in bundles])
                requested = True
                log.warning("the Ray cluster cannot place %s yet; waiting up to %.0f s (distributed.resource_wait_s) "
                            "for nodes to join", ", ".join(name for name, _ in missing),
                            config.distributed.resource_wait_s)
            time.sleep(min(poll_s, max(config.distributed.resource_wait_s - waited, 0.0)))
    finally:
        if requested:
            request_resources(bundles=[])
