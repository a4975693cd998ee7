"""trainer/training/control.py without a cluster: the driver's signal handling (real signals sent to
this process), the RunControl request, and the per-step decision over a real 2-rank gloo group.
The whole path (a launch stopped by SIGTERM/SIGINT, a drained node) is in tests/trainer/test_launch.py
and tests/trainer/test_multinode.py."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.training.control import Interrupted, Interrupts, RunControl, StepControl


class FakeControl:  # a stand-in for the RunControl actor handle: `.request_stop.remote(...)`
    def __init__(self) -> None:
        self.requests: list[tuple[str, bool]] = []
        self.request_stop = self

    def remote(self, reason: str, checkpoint: bool) -> None:
        self.requests.append((reason, checkpoint))


def test_the_first_signal_asks_the_workers_to_stop_and_restore_puts_the_old_handlers_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    interrupts = Interrupts(grace_s=0.3)
    interrupts.install()
    interrupts.install()  # again, as after ray.init: restore still goes back to the first ones
    try:
        control = FakeControl()
        interrupts.training(control)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs the handler between bytecodes of the main thread
        assert control.requests == [("SIGTERM", True)] and interrupts.signum == signal.SIGTERM
        interrupts.check()  # within the grace period: nothing
        time.sleep(0.35)
        with pytest.raises(Interrupted, match=r"SIGTERM: the workers did not checkpoint within .*\(0.3 s\)") as info:
            interrupts.check()
        assert info.value.exit_status == 143
        with pytest.raises(Interrupted, match="a second signal after SIGTERM") as second:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert second.value.exit_status == 130
    finally:
        interrupts.restore()
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


def test_a_signal_with_no_step_running_raises_at_once() -> None:
    interrupts = Interrupts(grace_s=25)
    interrupts.install()
    try:
        with pytest.raises(Interrupted, match="SIGINT: no training step is running"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        interrupts.restore()


def test_the_run_control_keeps_the_first_request_and_wakes_a_waiter() -> None:
    control = RunControl()
    assert control.wait_for_request(0.01) is None
    answers: list[Any] = []
    waiter = threading.Thread(target=lambda: answers.append(control.wait_for_request(30)))
    waiter.start()
    started = time.monotonic()
    control.request_stop("the lease was lost", False)
    control.request_stop("SIGTERM", True)  # later requests change nothing
    waiter.join(5)
    assert answers == [("the lease was lost", False)] and time.monotonic() - started < 5


class FixedWatcher:  # a StopWatcher whose answer is already in
    def __init__(self, request: tuple[str, bool] | None) -> None:
        self.request = request

    def close(self) -> None:
        pass


def _decide(rank: int, port: int, requests: list[Any], out: Any) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        control = StepControl(FixedWatcher(requests[rank]), world=2, in_ray_train=False)
        decision = control.decide()
        out.put((rank, decision.stop, decision.checkpoint_before_stop, decision.reason, decision.check_preemption))
        control.close()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("requests", "expected"), [
    ([None, None], {0: (False, True, ""), 1: (False, True, "")}),
    # one rank saw the request first: both stop after this step, both checkpoint
    ([("SIGTERM", True), None], {0: (True, True, "SIGTERM"), 1: (True, True, "another rank's")}),
    # a lost lease on one rank: nobody writes
    ([("SIGTERM", True), ("the lease was lost", False)],
     {0: (True, False, "SIGTERM"), 1: (True, False, "the lease was lost")}),
])
def test_every_rank_takes_the_same_decision(requests: list[Any], expected: dict[int, tuple[bool, bool, str]]) -> None:
    context = mp.get_context("spawn")
    out = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_decide, args=(rank, port, requests, out)) for rank in range(2)]
    for process in processes:
        process.start()
    decisions = {}
    for _ in processes:
        rank, stop, checkpoint, reason, check = out.get(timeout=120)
        decisions[rank] = (stop, checkpoint, reason)
        assert check is False  # outside Ray Train: no preemption checks
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert decisions == expected
