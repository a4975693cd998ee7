"""Stopping a run on purpose: the driver's stop request, and drained (preempted) nodes.

Clusters stop trainers all the time: `ray job stop` and pod deletion send the driver SIGTERM,
Ctrl-C sends SIGINT, a spot node gets a preemption notice. Two mechanisms, both ending in a
checkpoint of the step the workers are on:

* **The driver's stop request** (trainer/launch.py, on SIGTERM/SIGINT or a lost lease): a small Ray
  actor, `RunControl`, named per run, holds the request (its reason, and whether to checkpoint).
  Each worker waits on it from a daemon thread (`StopWatcher`: the request arrives within
  milliseconds, and the training thread only reads an attribute) and the loop turns the flags into
  one decision per step that every rank
  shares (`StepControl`): with several workers the ranks' flags are all-reduced (MAX) over a gloo
  group of their own, on the host, so the decision costs no device sync and all ranks stop after
  the same step. They checkpoint it (a lost lease: without writing anything, the run is another
  trainer's now) and return, so Ray Train's `fit()` returns a normal result whose checkpoint is
  the one just written.
* **A drained node** (Ray's node drain with a deadline: a spot preemption notice, a deleted
  KubeRay worker pod): Ray Train's own PreemptionWatcher sees it and tells every worker, which
  `ray.train.get_preemption_info()` returns (a barrier: every rank calls it at the same step, here
  every `PREEMPTION_POLL_S` seconds of the shared decision). The workers checkpoint the step they
  are on at once and go on training; at the deadline Ray Train restarts the worker group on the
  other nodes from the latest committed checkpoint (Ray leaves draining nodes out of new
  placements), which is the one just written.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

# numpy and torch are imported where StepControl needs them: the RunControl actor unpickles this
# module in a process of its own at every launch, and importing torch there costs seconds of CPU.
log = logging.getLogger(__name__)

WAIT_S = 30.0  # how long one wait of a worker on the driver's RunControl lasts before the next
RETRY_S = 1.0  # after a failed wait (the control not found yet)
PREEMPTION_POLL_S = 2.0  # how often the workers ask Ray Train whether one of their nodes is drained


class RunControl:
    """The driver's stop request for one run's workers (a threaded Ray actor: `start_run_control`).
    The first request wins. Workers wait on it (`wait_for_request`), so that a request reaches
    them within milliseconds, not a poll interval."""

    def __init__(self) -> None:
        self._request: tuple[str, bool] | None = None
        self._requested = threading.Event()

    def request_stop(self, reason: str, checkpoint: bool) -> None:
        if self._request is None:
            self._request = (reason, checkpoint)
            self._requested.set()

    def wait_for_request(self, timeout_s: float) -> tuple[str, bool] | None:
        """The request, as soon as there is one, or None after `timeout_s`."""
        self._requested.wait(timeout_s)
        return self._request


def start_run_control(name: str, workers: int) -> Any:
    """The RunControl actor of a run (on the driver): no CPU, named so that the workers find it,
    a thread for each worker's wait and a few for the driver. It belongs to the driver's job and
    ends with it."""
    import ray

    return ray.remote(num_cpus=0, max_concurrency=workers + 4)(RunControl).options(name=name).remote()


class Interrupted(Exception):
    """The driver was told to stop (SIGTERM/SIGINT) where no worker can checkpoint for it: before
    training started, after it ended, on a second signal, or past checkpoint.stop_grace_s."""

    def __init__(self, signum: int, why: str) -> None:
        self.signum, self.why = signum, why
        super().__init__(f"{signal.Signals(signum).name}: {why}")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum  # 143 for SIGTERM, 130 for SIGINT, as a shell reports a signal's death


class Interrupts:
    """The driver's SIGTERM and SIGINT (trainer/launch.py): while the workers train, the first
    signal becomes the run's stop request (the workers checkpoint the step they are on and
    return, within `grace_s`); elsewhere, and for a second signal, it raises Interrupted in the
    main thread. `install` again after ray.init, which installs its own SIGTERM handler."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self.deadline: float | None = None
        self.control: Any = None  # the RunControl actor while the workers train
        self.run_dir: str | None = None  # RUN_DIR, once known (for the last line)
        self._previous: dict[int, Any] = {}  # the handlers the first install found

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous.setdefault(signum, signal.signal(signum, self._handle))

    def restore(self) -> None:
        """The handlers `install` found, back: a run called from other code (a notebook, a test
        session) leaves that process's SIGTERM and SIGINT as they were."""
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise Interrupted(signum, f"a second signal after {signal.Signals(self.signum).name}: stopping now")
        self.signum = signum
        if self.control is None:
            raise Interrupted(signum, "no training step is running")
        self.deadline = time.monotonic() + self.grace_s
        log.warning("%s: the workers stop after the step they are on and checkpoint it (up to %.0f s, "
                    "checkpoint.stop_grace_s); a second signal stops at once", name, self.grace_s)
        self.control.request_stop.remote(name, True)

    def training(self, control: Any) -> None:
        """The workers train from now on, told through `control` (None again: they have finished)."""
        self.control = control

    def check(self) -> None:
        """Raise Interrupted when the workers have not stopped within the grace period."""
        if self.deadline is not None and self.signum is not None and time.monotonic() > self.deadline:
            raise Interrupted(self.signum, f"the workers did not checkpoint within checkpoint.stop_grace_s "
                                           f"({self.grace_s:g} s)")


class StopWatcher:
    """A worker's view of its run's RunControl: a daemon thread waits on it and keeps the answer,
    so that the training thread never waits on Ray. A control that cannot be reached (the driver
    is gone: then Ray ends the workers anyway) reads as no request."""

    def __init__(self, name: str, namespace: str | None) -> None:
        self.name, self.namespace = name, namespace
        self.request: tuple[str, bool] | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._wait, name="run-control", daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        import ray

        handle = None
        while not self._done.is_set() and self.request is None:
            try:
                if handle is None:
                    handle = ray.get_actor(self.name, namespace=self.namespace)
                self.request = ray.get(handle.wait_for_request.remote(WAIT_S), timeout=WAIT_S + 30)
            except Exception as error:  # noqa: BLE001 - an unreachable control is no request
                log.debug("run control %s not reachable: %s", self.name, error)
                handle = None
                self._done.wait(RETRY_S)

    def close(self) -> None:
        self._done.set()


@dataclass(frozen=True)
class Decision:
    """What the ranks decided together after a step."""

    stop: bool = False  # the driver asked the run to stop
    checkpoint_before_stop: bool = True  # False: a lost lease, nothing more may be written
    reason: str = ""
    check_preemption: bool = False  # every rank asks Ray Train about drained nodes now


class StepControl:
    """One decision per step shared by every rank (module doc). `watcher` None: no driver control
    (tests and benchmarks without Ray): only the preemption checks, and those only in Ray Train."""

    def __init__(self, watcher: StopWatcher | None, world: int, in_ray_train: bool) -> None:
        import numpy as np
        import torch
        import torch.distributed as dist

        self.watcher, self.world, self.in_ray_train = watcher, world, in_ray_train
        self._all_reduce_max = functools.partial(dist.all_reduce, op=dist.ReduceOp.MAX)
        self.group = dist.new_group(backend="gloo") if world > 1 else None  # host flags, whatever the device
        self._flags = np.zeros(3, dtype=np.float32)  # stop, checkpoint before stopping, preemption check due
        self._tensor = torch.from_numpy(self._flags)
        self._last_preemption_check = time.monotonic()
        self.preemption_handled = False

    def decide(self) -> Decision:
        """This step's decision, the same on every rank (a collective when world > 1)."""
        request = self.watcher.request if self.watcher is not None else None
        now = time.monotonic()
        due = (self.in_ray_train and not self.preemption_handled
               and now - self._last_preemption_check >= PREEMPTION_POLL_S)
        self._flags[:] = (request is not None, request is None or request[1], due)
        if self.group is not None:
            # MAX of stop and preemption-check-due, MIN of checkpoint-before-stop: as one MAX of
            # (stop, 1 - checkpoint, due). Read through numpy: no tensor read, no device.
            self._flags[1] = 1.0 - self._flags[1]
            self._all_reduce_max(self._tensor, group=self.group)
            self._flags[1] = 1.0 - self._flags[1]
        stop, checkpoint, check = (bool(v) for v in self._flags)
        if check:
            self._last_preemption_check = now
        return Decision(stop=stop, checkpoint_before_stop=checkpoint,
                        reason=request[0] if request is not None else ("another rank's" if stop else ""),
                        check_preemption=check)

    def preempted(self) -> Any:
        """Ray Train's PreemptionInfo (deadline, ranks) when a node of this run is drained, else
        None; a barrier of every rank (call it where `decide` said check_preemption)."""
        import ray.train

        ask = getattr(ray.train, "get_preemption_info", None)  # Ray Train V2 (Ray >= 2.5x; alpha API)
        if ask is None:
            self.preemption_handled = True  # nothing to ask: never again
            log.warning("this Ray has no ray.train.get_preemption_info: drained nodes are not checkpointed early")
            return None
        return ask()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()
