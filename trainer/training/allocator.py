"""glibc malloc settings for the processes that train and evaluate (Ray workers, the evaluation
actor, the benchmarks).

A training step allocates and frees large temporaries: a (128, 36, 2048) float32 activation is
37.7 MB, beyond the largest size glibc keeps on its heap by default (its dynamic mmap threshold
stops at 32 MB). Every such tensor is then a fresh mmap whose pages are faulted in and zeroed by
the kernel one 4 KB page at a time, and unmapped when freed: 22 ms instead of 2.6 ms to allocate
and fill one on the 2-core development machine (a KVM guest, where page faults are dear), about
3 s of a 25 s paper-size CPU step (docs/benchmarks.md). Raising the mmap threshold keeps these
blocks on the heap, where the next step reuses them, and the trim threshold keeps the heap from
being handed back to the kernel between steps. Both only take effect from the environment at
process start (``mallopt`` caps the threshold at 32 MB), hence environment variables, which Ray
sets on the workers it starts (``RunConfig.worker_runtime_env``, the actor's ``runtime_env``).

The cost: up to ``MALLOC_TRIM_THRESHOLD_`` of freed memory stays with the process instead of
going back to the system. Other allocators (jemalloc, tcmalloc, through ``LD_PRELOAD``) reuse
large blocks too; a variable already set in the environment is left as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

#: Allocations up to 1 GiB stay on the heap; up to 1 GiB of free heap stays with the process.
ENV_VARS: Mapping[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
}


def env_vars(existing: Mapping[str, str] | None = None) -> dict[str, str]:
    """ENV_VARS without the names `existing` sets (default: this process's environment): a
    value the user chose, e.g. in the job's runtime_env, wins."""
    existing = os.environ if existing is None else existing
    return {name: value for name, value in ENV_VARS.items() if name not in existing}


def configured() -> bool:
    """Whether this process started with every variable of ENV_VARS set (to any value)."""
    return all(name in os.environ for name in ENV_VARS)


def describe() -> str:
    """This process's settings among ENV_VARS, for logs and reports ("glibc defaults" if none)."""
    return " ".join(f"{name}={os.environ[name]}" for name in ENV_VARS if name in os.environ) or "glibc defaults"


def reexec_configured() -> None:
    """Replace this process by itself with ENV_VARS in its environment, unless they are set:
    for command-line programs (benchmarks) that allocate like a training worker."""
    if not configured():
        # orig_argv: the command line as given (interpreter options, -m or -c included)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env_vars()})
