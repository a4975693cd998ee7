"""The GPU acceptance run: `python bench/gpu_check.py [--output DIR]` (or `make gpu-check`).

Why it exists: the figures in docs/benchmarks.md come from machines lent for a few minutes. This
script is the whole check as one command, sized to finish within 8 minutes on one H200-class GPU
(141 GB, 16 CPU cores, 128 GB RAM, 64 GB disk, no network), Ray and DeepSpeed start-up included,
so that a short loan is enough and every loan measures the same thing. It installs nothing and
calls no pip: it runs with any Python >= 3.10 whose environment has CUDA torch and the project's
dependencies (installed or on PYTHONPATH), puts the checkout on the path of every process it
starts, and works on a host without a package registry (README, "GPUs"). Each part runs as a
subprocess with its own share of the time budget; a part that fails or hangs is recorded as
failed (with the last lines of its stderr) and the others still report their figures. The parts,
in the order they run (docs/benchmarks.md, "GPU acceptance run", says how their shares were sized):

* precision_probe: `bench/precision_probe.py`: the model's three GRUs (image, text over the padded
  captions, the decoder stepped with its state) and the whole model with bf16 and with fp16
  weights against float32, forward and backward; fails when an error exceeds its limit or a
  low-precision GRU did not run cuDNN (aten::_cudnn_rnn).
* model_speed_b128, model_speed_b512: `bench/model_speed.py` at batch 128 and 512 in the chosen
  precision (default bf16): the trainer's step on its DeepSpeed engine beside autocast.
* train: `trainer/launch.py` as users run it (`--config configs/coco.yaml` plus `--set`
  overrides): the paper-size model (coco.yaml's model section; vocabulary from the data), 1 GPU
  worker with 0.5 GPU and the evaluation actor with the other 0.5 on the same GPU, NCCL (Ray
  Train's backend when use_gpu is true), precision bf16, global batch 128, on the built-in
  synthetic features of the paper's shape (36 regions x 2048) generated into DIR/cache, for 3
  epochs of 100 steps; checkpoints in DIR/runs/<run name>. Recorded: steps, the median of the
  per-step samples/s, step time and data wait of RUN_DIR/train_log.jsonl (warm-up steps and the
  steps that overlap an evaluation of RUN_DIR/evaluations.jsonl excluded: the actor shares the
  GPU), the launcher's last-line JSON (best dev rsum and metrics), wall times, GPU memory (below).
* resume: the same command with the same checkpoint.run_name and one more epoch. Checked: the
  run logs "resuming at step S" for the train part's last checkpoint S, train_log.jsonl holds
  every step 1..N exactly once, the steps up to S are the train part's (written before the resume
  started) and the rest the resume's, and the run finishes its last epoch.
* train_fp16: a new run of one epoch in fp16 (dynamic loss scaling), without the evaluator:
  every step once, finite losses, a checkpoint of its last step (on a CPU, which DeepSpeed refuses
  fp16 on, the simulation runs it in the check's precision and says so).
* eval_speed: `bench/eval_speed.py --device cuda` at its default size (5000 images x 25000
  captions, D 2048), the reference loop timed on 500 queries and extrapolated (`--loop-queries`).
* compile: `bench/compile_speed.py`: the worker's step eager against `model.compile: true` (CUDA
  graphs) at batch 16, 128 and 512 (one caption bucket); it runs last and records the batch
  sizes it finished when its share runs out.

GPU memory: the worker reports torch.cuda.max_memory_allocated only as a Ray metric
(vsrn_train_accelerator_memory_bytes{kind="max_allocated"}), so the script scrapes Ray's metrics
endpoint during the train and resume parts (the port it gives the local Ray through
monitoring.metrics_export_port, or every node's port of the cluster of RAY_ADDRESS) and records
the largest value it saw; Ray exports every few seconds, so a value recorded just before a run
ends may be missed. It also samples `nvidia-smi --query-gpu=memory.used` every second during every
part: memory in use on the whole device (all processes: CUDA contexts, the caching allocators'
reserves, the evaluation actor), an upper bound rather than the worker's tensors.

Output (DIR, default gpu-check/ in the repository, git-ignored): gpu_check.json (machine, date,
every part's command, status, figures and stderr tail; rewritten after each part, so an
interrupted check keeps what it measured), gpu_check.md (tables ready to paste into
docs/benchmarks.md), logs/<part>.stdout.txt and .stderr.txt, the benchmarks' own JSON files, the
run directory and the synthetic dataset (about 2.3 GB, reused by a later check into the same DIR;
each check uses a new run name). Exit status: 0 when every part is ok, 1 when one failed, 2 for
bad arguments, 3 when CUDA is not available (one line on stderr, nothing else done: no files, no
Ray, no data).

Testing the script without a GPU: `--allow-cpu --tiny` runs the same orchestration on the CPU with
a tiny model and dataset (configs/tiny.yaml, 20 + 10 + 10 steps, small benchmark sizes), precision
chosen with --precision (fp32 or bf16 on CPU). It is for testing this script on a machine without a GPU;
its figures are not GPU figures, and the pinned run (`make gpu-check`) is without it.
RAY_ADDRESS, when set, is passed on: the launcher then attaches to that cluster instead of starting
a local Ray (as under `ray job submit`), which the tests use to save Ray's start-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the project's packages, installed or not (`python bench/gpu_check.py` from a checkout)
    sys.path.insert(0, str(ROOT))
DEFAULT_OUTPUT = ROOT / "gpu-check"
EXIT_OK, EXIT_PART_FAILED, EXIT_NO_CUDA = 0, 1, 3
STDERR_TAIL_LINES = 30
KILL_GRACE_S = 15.0  # after SIGTERM to a timed-out part's process group, before SIGKILL
MIN_PART_S = 5.0  # a part left with less of the budget than this is not started


# --------------------------------------------------------------------------------------------------
# What runs: the two profiles
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """Sizes of one kind of check. `shares` split the time budget between the parts; a part may
    also use what the parts before it left unused (see Check.part_timeout)."""

    name: str
    config: str  # launch.py --config, relative to the repository
    # launch.py --set values common to the trainer parts; the device's (use_gpu, 0.5 GPU for the
    # worker and 0.5 for the evaluation actor), precision, epochs and paths are added by Check.
    overrides: tuple[str, ...]
    train_epochs: int
    resume_epochs: int
    fp16_epochs: int  # the fp16 run: a new run of this many epochs, without the evaluation actor
    model_speed: tuple[tuple[int, int], ...]  # (batch, timed steps) per model_speed part
    model_speed_args: tuple[str, ...]
    probe_args: tuple[str, ...]
    compile_args: tuple[str, ...]  # bench/compile_speed.py: eager against compiled (model.compile)
    eval_speed_args: tuple[str, ...]
    budget_s: float
    shares: dict[str, float]


def paper_profile() -> Profile:
    """The pinned check: paper-size model, 2560 synthetic training images (12800 pairs: 100 steps
    of 128 per epoch), 500 dev and 1000 test images (the 5K 1k-5fold protocol needs 5000: only
    `all` is run), so that generation, sharding, 400 bf16 steps, 100 fp16 steps, the evaluations
    and the benchmarks fit in 8 minutes. How the shares were sized: docs/benchmarks.md, "GPU
    acceptance run"."""
    return Profile(
        name="paper",
        config="configs/coco.yaml",
        overrides=(
            "data.train=", "data.dev=", "data.test=", "data.vocab=",  # coco.yaml's s3:// shards -> synthetic
            "data.synthetic_train_images=2560", "data.synthetic_dev_images=500", "data.synthetic_test_images=1000",
            "data.synthetic_regions=36", "data.synthetic_feature_dim=2048", "data.loader_workers=4",
            "optim.global_batch_size=128",
            "distributed.workers=1", "distributed.cpus_per_worker=8", "distributed.zero_stage=0",
            "checkpoint.every_steps=0", "checkpoint.keep_last=2", "checkpoint.max_failures=0",
            "eval.enabled=true", "eval.test_protocols=[all]", "eval.dev_images=500", "eval.cpus=4",
            "eval.qualitative_queries=0", "logging.interval_steps=50", "monitoring.enabled=true",
        ),
        train_epochs=3,
        resume_epochs=4,
        fp16_epochs=1,
        model_speed=((128, 30), (512, 20)),
        model_speed_args=("--warmup", "3"),
        probe_args=("--batch-size", "64"),
        # Captions of 10-15 tokens: one caption bucket, one compilation per batch size.
        compile_args=("--batch-sizes", "16", "128", "512", "--lengths", "uniform:10:15", "--steps", "20",
                      "--warmup", "2"),
        eval_speed_args=("--repeat", "5", "--loop-queries", "500"),
        budget_s=480.0,
        shares={"precision_probe": 20, "model_speed_b128": 35, "model_speed_b512": 40, "train": 165,
                "resume": 70, "train_fp16": 55, "eval_speed": 35, "compile": 60},
    )


def tiny_profile() -> Profile:
    """For testing the script without a GPU: configs/tiny.yaml's small model on 64 synthetic images
    (12 regions x 64), 10 steps of 32 per epoch, small benchmark sizes (the parts keep their names
    model_speed_b128 and model_speed_b512; their figures give the batch, 4 and 8). Not a GPU figure."""
    return Profile(
        name="tiny",
        config="configs/tiny.yaml",
        overrides=(
            "data.synthetic_train_images=64", "data.synthetic_dev_images=32", "data.synthetic_test_images=32",
            "data.loader_workers=1", "data.pool_images=64",
            "optim.global_batch_size=32", "optim.warmup_epochs=0",
            "distributed.workers=1", "distributed.cpus_per_worker=1", "distributed.zero_stage=0",
            "checkpoint.every_steps=0", "checkpoint.keep_last=2", "checkpoint.max_failures=0",
            "eval.enabled=true", "eval.test_protocols=[all]", "eval.dev_images=32", "eval.cpus=0.5",
            "eval.qualitative_queries=0", "logging.interval_steps=5", "monitoring.enabled=true",
        ),
        train_epochs=2,
        resume_epochs=3,
        fp16_epochs=1,
        model_speed=((4, 2), (8, 2)),
        model_speed_args=("--warmup", "1", "--small"),
        probe_args=("--batch-size", "4", "--small"),
        compile_args=("--widths", "tiny", "--batch-sizes", "4", "--regions", "4", "--lengths", "uniform:4:6",
                      "--steps", "2", "--warmup", "1"),
        eval_speed_args=("--images", "200", "--dim", "64", "--repeat", "1"),
        budget_s=1500.0,
        shares={"precision_probe": 90, "model_speed_b128": 120, "model_speed_b512": 120, "train": 390,
                "resume": 240, "train_fp16": 150, "eval_speed": 90, "compile": 300},
    )


PART_ORDER = ("precision_probe", "model_speed_b128", "model_speed_b512", "train", "resume", "train_fp16", "eval_speed",
              "compile")
PART_ALIASES = {"model_speed": ("model_speed_b128", "model_speed_b512")}


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class PartResult:
    """One part's record in gpu_check.json. status is "ok" or "failed"; `reason` says why not ok."""

    name: str
    status: str = "failed"
    reason: str = ""
    command: list[str] = field(default_factory=list)
    command_line: str = ""
    timeout_s: float = 0.0
    wall_s: float | None = None
    returncode: int | None = None
    stdout_log: str = ""
    stderr_log: str = ""
    stderr_tail: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.status, self.reason = "failed", reason


@dataclass
class Finished:
    """How a part's subprocess ended."""

    returncode: int | None  # None: killed after its timeout
    wall_s: float
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


# --------------------------------------------------------------------------------------------------
# Subprocesses with a timeout that also ends their children (Ray's processes)
# --------------------------------------------------------------------------------------------------


def run_logged(command: Sequence[str], timeout_s: float, stdout_path: Path, stderr_path: Path,
               env: dict[str, str]) -> Finished:
    """Run `command` in the repository with its output in two files. It gets its own session, so
    that on timeout (or Ctrl-C here) SIGTERM and then SIGKILL reach the whole process group it
    started (a local Ray's processes included), not just the launcher."""
    started = time.perf_counter()
    with open(stdout_path, "w", encoding="utf-8") as out, open(stderr_path, "w", encoding="utf-8") as err:
        process = subprocess.Popen(list(command), cwd=ROOT, stdout=out, stderr=err, env=env,
                                   start_new_session=True)
        returncode: int | None
        try:
            returncode = process.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            _end_group(process)
            returncode = None
        except BaseException:
            _end_group(process)
            raise
    return Finished(returncode, time.perf_counter() - started, _read(stdout_path), _read(stderr_path))


def _end_group(process: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader exited: make sure nothing of its group is left
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _tail(text: str, lines: int = STDERR_TAIL_LINES) -> list[str]:
    return [line for line in text.splitlines() if line.strip()][-lines:]


# --------------------------------------------------------------------------------------------------
# GPU memory: nvidia-smi sampling and Ray's metrics endpoint
# --------------------------------------------------------------------------------------------------


class Poller:
    """Calls `sample` every `interval_s` in a daemon thread between start() and stop(). Why a
    thread: both memory sources are only visible from outside the part's processes while they run."""

    def __init__(self, sample: Callable[[], None], interval_s: float) -> None:
        self._sample, self._interval = sample, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"]


class NvidiaSmiMemory:
    """Largest `nvidia-smi` memory.used seen per GPU: the whole device, every process on it."""

    def __init__(self) -> None:
        self.available = True
        self.error = ""
        self.samples = 0
        self.first: dict[str, int] = {}
        self.max_used: dict[str, int] = {}
        self.total: dict[str, int] = {}

    def sample(self) -> None:
        if not self.available:
            return
        try:
            output = subprocess.run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError) as error:
            if self.samples == 0:
                self.available, self.error = False, f"nvidia-smi unavailable: {error}"
            return
        for line in output.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                continue
            index, used, total = parts[0], int(parts[1]), int(parts[2])
            self.first.setdefault(index, used)
            self.max_used[index] = max(used, self.max_used.get(index, 0))
            self.total[index] = total
        self.samples += 1

    def figures(self) -> dict[str, Any]:
        if not self.available or not self.samples:
            return {"source": "nvidia-smi memory.used", "available": False, "error": self.error or "no sample"}
        return {"source": "nvidia-smi --query-gpu=memory.used, sampled every 1 s: memory in use on the whole "
                          "device (all processes, CUDA contexts and allocator reserves included)",
                "available": True, "samples": self.samples, "used_at_start_mib": self.first,
                "used_max_mib": self.max_used, "total_mib": self.total,
                "used_max_mib_any_gpu": max(self.max_used.values())}


ACCEL_METRIC = "ray_vsrn_train_accelerator_memory_bytes"
STEPS_METRIC = "ray_vsrn_train_steps_total"


class RayMetricsScraper:
    """Largest worker `torch.cuda.max_memory_allocated` (and steps counter) seen on Ray's metrics
    endpoints; the worker exports the memory only there (trainer/training/recorder.py, monitoring/metrics.py)."""

    def __init__(self, targets: list[str], note: str = "") -> None:
        self.targets = targets
        self.note = note
        self.scrapes_ok = 0
        self.scrapes_failed = 0
        self.last_error = ""
        self.max_allocated: int | None = None
        self.max_reserved: int | None = None
        self.steps_max: float | None = None

    def sample(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        for target in self.targets:
            try:
                with urllib.request.urlopen(f"http://{target}/metrics", timeout=3) as response:
                    text = response.read().decode("utf-8", errors="replace")
                families = list(text_string_to_metric_families(text))
            except Exception as error:  # noqa: BLE001 - an endpoint not up yet, or gone: count and go on
                self.scrapes_failed += 1
                self.last_error = f"{type(error).__name__}: {error}"
                continue
            self.scrapes_ok += 1
            for family in families:
                for sample in family.samples:
                    if sample.name == ACCEL_METRIC and sample.labels.get("kind") == "max_allocated":
                        self.max_allocated = max(int(sample.value), self.max_allocated or 0)
                    elif sample.name == ACCEL_METRIC and sample.labels.get("kind") == "reserved":
                        self.max_reserved = max(int(sample.value), self.max_reserved or 0)
                    elif sample.name == STEPS_METRIC:
                        self.steps_max = max(sample.value, self.steps_max or 0.0)

    def figures(self) -> dict[str, Any]:
        return {"source": f"{ACCEL_METRIC} on Ray's metrics endpoint(s), scraped every 2 s: the training "
                          "worker's torch.cuda.max_memory_allocated / memory_reserved (absent on CPU)",
                "targets": self.targets, "note": self.note, "scrapes_ok": self.scrapes_ok,
                "scrapes_failed": self.scrapes_failed, "last_error": self.last_error,
                "worker_max_allocated_bytes": self.max_allocated,
                "worker_max_allocated_gib": None if self.max_allocated is None else self.max_allocated / 2**30,
                "worker_max_reserved_bytes": self.max_reserved,
                "steps_total_seen": self.steps_max}


def free_port() -> int:
    """A free TCP port on loopback for the local Ray's metrics endpoint (chosen here so that this
    script knows where to scrape)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cluster_metrics_targets(address: str) -> tuple[list[str], str]:
    """host:port of every alive node's metrics endpoint of the cluster at `address` (RAY_ADDRESS),
    which launch.py attaches to instead of starting a local Ray; ([], why) when not found."""
    try:
        import ray

        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        try:
            nodes = [node for node in ray.nodes() if node.get("Alive")]
        finally:
            ray.shutdown()
    except Exception as error:  # noqa: BLE001 - memory figures are optional; the run is not
        return [], f"could not list the nodes of {address}: {type(error).__name__}: {error}"
    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in nodes if n.get("MetricsExportPort")]
    return targets, f"the metrics endpoints of the cluster at RAY_ADDRESS={address}"


# --------------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------------


CUDA_PROBE = """
import json, torch
p = torch.cuda.get_device_properties(0)
print(json.dumps({"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                  "gpu_memory_gib": round(p.total_memory / 2**30, 1), "compute_capability": f"{p.major}.{p.minor}",
                  "torch_built_with_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "bf16_supported": torch.cuda.is_bf16_supported()}))
"""


def machine_info(cuda: bool) -> dict[str, Any]:
    """GPU (from torch.cuda.get_device_name, in a subprocess so that this process holds no CUDA
    context on the GPU it measures), driver and CUDA versions, library versions, CPUs, memory."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(), "torch": torch.__version__, "torch_built_with_cuda": torch.version.cuda,
        "ray": _version("ray"), "deepspeed": _version("deepspeed"), "numpy": _version("numpy"),
        "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average_start": list(os.getloadavg()),
    }
    if cuda:
        try:
            probe = subprocess.run([sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True, timeout=120)
            info.update(json.loads(probe.stdout.strip().splitlines()[-1]))
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as error:
            info["gpu_probe_error"] = str(error)
        info.update(_nvidia_smi_versions())
    return info


def _nvidia_smi_versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        first = query.strip().splitlines()[0].split(",")
        out["nvidia_smi_gpu"], out["driver_version"] = first[0].strip(), first[1].strip()
        header = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        match = re.search(r"CUDA Version:\s*([\d.]+)", header)
        out["driver_cuda_version"] = match.group(1) if match else None
    except (OSError, subprocess.SubprocessError, IndexError) as error:
        out["nvidia_smi_error"] = str(error)
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)  # without importing it (deepspeed prints on import)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


# --------------------------------------------------------------------------------------------------
# The run's step log and checkpoints
# --------------------------------------------------------------------------------------------------


def read_step_log(run_dir: Path) -> list[dict[str, Any]]:
    """The run's train_log.jsonl lines as written ([] before the first step)."""
    from data_shards.storage import open_location
    from trainer.run.step_log import read_step_lines

    return read_step_lines(open_location(str(run_dir))) or []


def warmup_steps(count: int) -> int:
    """Steps left out of the medians at the start of a run segment: CUDA/cuDNN initialization,
    the allocator growing, the reader filling its pools. A fifth of the steps, 1 to 20."""
    return min(20, max(1, count // 5))


def evaluation_windows(run_dir: Path) -> list[tuple[float, float]]:
    """(start, end) unix times of every evaluation of the run (RUN_DIR/evaluations.jsonl:
    evaluated_at minus elapsed_s, to evaluated_at): while one runs, the evaluation actor shares
    the training GPU, so steps in these windows are not the trainer's own speed."""
    from trainer.run.history import read_evaluations

    windows = []
    for entry in read_evaluations(str(run_dir)):
        try:
            end = datetime.datetime.fromisoformat(str(entry.evaluated_at).replace("Z", "+00:00")).timestamp()
            windows.append((end - float(entry.elapsed_s), end))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
    return windows


def _overlaps_evaluation(record: dict[str, Any], windows: list[tuple[float, float]]) -> bool:
    end = float(record["time"])
    start = end - float(record["step_time_s"]) - float(record["data_wait_s"])
    return any(start < w_end and end > w_start for w_start, w_end in windows)


def throughput(records: list[dict[str, Any]], global_batch: int,
               evaluations: list[tuple[float, float]] | None = None) -> dict[str, Any]:
    """Medians of the per-step figures, excluding the first warmup_steps(len) records and the steps
    that overlap an evaluation (`evaluations`: evaluation_windows). The log's samples_per_s is
    pairs / (step + data wait); compute_samples_per_s leaves the wait out."""
    skip = warmup_steps(len(records))
    windows = evaluations or []
    steady = [r for r in records[skip:] if not _overlaps_evaluation(r, windows)]
    during = len(records[skip:]) - len(steady)
    if not steady:
        return {"steps_measured": 0, "warmup_steps_excluded": skip, "steps_during_evaluations_excluded": during}
    step_time = statistics.median(float(r["step_time_s"]) for r in steady)
    return {"warmup_steps_excluded": skip, "steps_during_evaluations_excluded": during,
            "evaluations_seen": len(windows), "steps_measured": len(steady),
            "samples_per_s_median": statistics.median(float(r["samples_per_s"]) for r in steady),
            "step_time_s_median": step_time, "data_wait_s_median": statistics.median(float(r["data_wait_s"]) for r in steady),
            "compute_samples_per_s_median": global_batch / step_time if step_time > 0 else None,
            "samples_per_s_p10": _quantile([float(r["samples_per_s"]) for r in steady], 0.1),
            "samples_per_s_p90": _quantile([float(r["samples_per_s"]) for r in steady], 0.9)}


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def read_train_state(checkpoint: str | None) -> dict[str, Any] | None:
    if not checkpoint:
        return None
    from trainer.run.layout import TRAIN_STATE_FILE  # the project is importable: bench/ runs from its root

    path = Path(checkpoint) / TRAIN_STATE_FILE
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def last_json_line(stdout: str) -> dict[str, Any] | None:
    """launch.py's pinned summary: the last line of its stdout is one JSON object."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    try:
        value = json.loads(lines[-1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------------


class Check:
    """Runs the selected parts in order, records each, rewrites the summary after each."""

    def __init__(self, args: argparse.Namespace, profile: Profile, device: str) -> None:
        self.args, self.profile, self.device = args, profile, device
        self.output: Path = args.output.resolve()
        self.logs = self.output / "logs"
        self.run_name = args.run_name or time.strftime("gpu-check-%Y%m%d-%H%M%S")
        self.runs = self.output / "runs"
        self.run_dir = self.runs / self.run_name
        self.budget_s = float(args.budget_s or profile.budget_s)
        self.started = time.perf_counter()
        self.deadline = self.started + self.budget_s
        self.parts: list[str] = args.parts
        self.results: dict[str, PartResult] = {}
        self.ray_address = os.environ.get("RAY_ADDRESS", "")
        self.machine: dict[str, Any] = {}
        self.metrics_port = 0 if self.ray_address else free_port()
        self.metrics_targets: list[str] = []
        self.metrics_note = ""

    # ---- helpers

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # the logs are complete up to a timeout
        # The project's packages for every part and for the Ray workers of a local cluster (which
        # inherit this environment), with or without `pip install -e .`: a host without a package
        # registry runs the project from its checkout, its dependencies on PYTHONPATH too.
        path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *[p for p in path if Path(p).resolve() != ROOT]])
        return env

    def part_timeout(self, name: str) -> float:
        """Its share of the budget plus what earlier parts left: the time to the deadline minus
        the shares of the parts still to come."""
        later = self.parts[self.parts.index(name) + 1:]
        reserved = sum(self.profile.shares[p] * self.budget_s / self.profile.budget_s for p in later)
        return self.deadline - time.perf_counter() - reserved

    def execute(self, part: PartResult, command: list[str], memory_from_ray: bool = False) -> Finished | None:
        """Run one part's command with its timeout and the memory samplers; None if not started."""
        part.command = command
        part.command_line = shlex.join(_relative(command))
        part.timeout_s = round(self.part_timeout(part.name), 1)
        part.stdout_log = str(self.logs / f"{part.name}.stdout.txt")
        part.stderr_log = str(self.logs / f"{part.name}.stderr.txt")
        if part.timeout_s < MIN_PART_S:
            part.fail(f"not run: {part.timeout_s:.0f} s left of the {self.budget_s:.0f} s budget")
            return None
        print(f"gpu_check: {part.name}: {part.command_line} (timeout {part.timeout_s:.0f} s)", flush=True)
        smi = NvidiaSmiMemory()
        pollers = [Poller(smi.sample, 1.0).start()] if self.device == "cuda" else []
        scraper = RayMetricsScraper(self.metrics_targets, self.metrics_note) if memory_from_ray else None
        if scraper is not None and self.metrics_targets:
            pollers.append(Poller(scraper.sample, 2.0).start())
        try:
            finished = run_logged(command, part.timeout_s, Path(part.stdout_log), Path(part.stderr_log), self.env())
        finally:
            for poller in pollers:
                poller.stop()
        part.wall_s = round(finished.wall_s, 1)
        part.returncode = finished.returncode
        part.stderr_tail = _tail(finished.stderr, STDERR_TAIL_LINES if finished.returncode != 0 else 8)
        if self.device == "cuda":
            part.figures["gpu_memory_nvidia_smi"] = smi.figures()
        if scraper is not None:
            part.figures["ray_metrics"] = scraper.figures()
        if finished.timed_out:
            part.fail(f"timed out after {part.timeout_s:.0f} s (process group terminated)")
        elif finished.returncode != 0:
            part.fail(f"exit status {finished.returncode}")
        else:
            part.status = "ok"
        return finished

    # ---- parts

    def run_for_json(self, part: PartResult, command: list[str], out: Path,
                     statuses: tuple[int, ...] = (0,)) -> dict[str, Any] | None:
        """Run a benchmark that writes its figures to `out` as JSON; its payload, or None when the
        part failed (recorded in `part`). `statuses`: the exit statuses that still wrote figures."""
        out.unlink(missing_ok=True)
        finished = self.execute(part, command)
        if finished is None or finished.returncode not in statuses:
            return None
        try:
            payload = json.loads(out.read_text())
        except (OSError, ValueError) as error:
            part.fail(f"no figures in {out}: {error}")
            return None
        part.figures["json"] = str(out)
        return payload if isinstance(payload, dict) else None

    def precision_probe(self, part: PartResult) -> None:
        out = self.output / "precision_probe.json"
        command = [sys.executable, str(ROOT / "bench" / "precision_probe.py"), "--device", self.device,
                   *self.profile.probe_args, "--precision", "bf16", "fp16", "--json", str(out)]
        payload = self.run_for_json(part, command, out, statuses=(0, 1))  # 1: a case failed; its figures are there
        if payload is None:
            return
        part.figures.update({k: payload.get(k) for k in ("device", "batch", "gpu", "cudnn", "cases")})
        failed = [f"{c['precision']} {c['case']}" for c in payload.get("cases", []) if c.get("status") != "ok"]
        if failed:
            part.fail(f"relative errors over the limits or non-finite values: {', '.join(failed)}")
        elif self.device == "cuda" and not all((c.get("cudnn_rnn_calls") or 0) > 0 for c in payload["cases"]):
            part.fail("a low-precision GRU did not run cuDNN's kernel (aten::_cudnn_rnn not called)")

    def model_speed(self, part: PartResult, batch: int, steps: int) -> None:
        out = self.output / f"model_speed_b{batch}.json"
        command = [sys.executable, str(ROOT / "bench" / "model_speed.py"), "--device", self.device,
                   "--batch-size", str(batch), "--steps", str(steps), *self.profile.model_speed_args,
                   "--precision", self.args.precision, "--path", "trainer", "autocast", "--json", str(out)]
        payload = self.run_for_json(part, command, out)
        if payload is None:
            return
        results = payload.get("results")
        if not isinstance(results, list) or not results:
            part.fail(f"no figures in {out}: no results")
            return
        part.figures.update({"machine": payload.get("machine"), "batch": batch, "results": results})

    def eval_speed(self, part: PartResult) -> None:
        out = self.output / "eval_speed.json"
        command = [sys.executable, str(ROOT / "bench" / "eval_speed.py"), "--device", self.device,
                   *self.profile.eval_speed_args, "--json", str(out)]
        payload = self.run_for_json(part, command, out)
        if payload is None:
            return
        keep = ("images", "captions", "dim", "device", "vectorized_s", "vectorized_runs_s", "loop_s",
                "loop_queries", "loop_extrapolated", "speedup", "memory", "agreement", "metrics")
        part.figures.update({k: payload.get(k) for k in keep})

    def compile(self, part: PartResult) -> None:
        """bench/compile_speed.py: the worker's step eager, then compiled (model.compile: true;
        CUDA graphs on CUDA), per batch size. It prints each loop's figures as it finishes, so a
        part ended by its timeout still records the batch sizes it measured."""
        out = self.output / "compile_speed.json"
        out.unlink(missing_ok=True)
        precision = self.args.precision if self.args.precision in ("fp32", "bf16") else "bf16"
        command = [sys.executable, str(ROOT / "bench" / "compile_speed.py"), "--device", self.device,
                   "--precision", precision, *self.profile.compile_args, "--json", str(out)]
        finished = self.execute(part, command)
        if finished is None:
            return
        results = []
        for line in finished.stdout.splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "loop" in value:
                results.append(value)
        part.figures.update({"json": str(out) if out.exists() else None, "precision": precision, "results": results})
        if part.status == "ok" and not results:
            part.fail("bench/compile_speed.py printed no results")

    def launch_command(self, epochs: int, precision: str | None = None, run_name: str | None = None,
                       extra: Sequence[str] = ()) -> list[str]:
        precision = precision or self.args.precision
        dist = ["distributed.use_gpu=" + ("true" if self.device == "cuda" else "false"),
                f"distributed.precision={precision}"]
        if self.device == "cuda":
            dist += ["distributed.gpus_per_worker=0.5", "eval.gpus=0.5"]
        else:
            dist += ["eval.gpus=0"]
        overrides = [*self.profile.overrides, *dist, f"optim.epochs={epochs}",
                     f"data.cache_dir={self.output / 'cache'}", f"checkpoint.storage_path={self.runs}",
                     f"checkpoint.run_name={run_name or self.run_name}", *extra]
        if self.metrics_port:
            overrides.append(f"monitoring.metrics_export_port={self.metrics_port}")
        command = [sys.executable, str(ROOT / "trainer" / "launch.py"), "--config", str(ROOT / self.profile.config)]
        for value in overrides:
            command += ["--set", value]
        return command

    def common_launch_checks(self, part: PartResult, finished: Finished, evaluated: bool = True) -> dict[str, Any] | None:
        summary = last_json_line(finished.stdout)
        if summary is None:
            part.fail("the launcher's last stdout line is not its JSON summary")
            return None
        best = summary.get("best") or {}
        part.figures.update({
            "launch_summary": summary, "launch_wall_s": summary.get("wall_s"),
            "best_checkpoint": best.get("checkpoint"), "best_step": best.get("step"),
            "best_dev_rsum": best.get("dev_rsum"), "metrics": best.get("metrics"),
            "test_rsum_all": ((best.get("metrics") or {}).get("all") or {}).get("rsum"),
        })
        expected = f"on 1 {'GPU' if self.device == 'cuda' else 'CPU'} worker(s)"
        if expected not in finished.stderr:
            part.fail(f"the worker did not log training {expected}")
            return None
        if evaluated and not best.get("metrics"):
            part.fail("no evaluated checkpoint in the launcher's summary (best is empty)")
            return None
        return summary

    def launch_and_read(self, part: PartResult, epochs: int, precision: str | None = None,
                        run_name: str | None = None, extra: Sequence[str] = (),
                        evaluated: bool = True) -> tuple[Finished, dict[str, Any], list[dict[str, Any]], list[int],
                                                         dict[str, Any] | None, int] | None:
        """Run the launcher for `epochs` and read back (the finished process, its summary, the step
        records, their steps, the latest checkpoint's train state, the global batch); None when the
        part failed (recorded in `part`)."""
        finished = self.execute(part, self.launch_command(epochs, precision, run_name, extra), memory_from_ray=True)
        if finished is None or part.status != "ok":
            return None
        summary = self.common_launch_checks(part, finished, evaluated)
        if summary is None:
            return None
        records = read_step_log(self.runs / (run_name or self.run_name))
        steps = [int(r["step"]) for r in records]
        return (finished, summary, records, steps, read_train_state(summary.get("latest_checkpoint")),
                self._global_batch())

    def train(self, part: PartResult) -> None:
        if self.run_dir.exists():  # the launcher would resume that run instead of starting one
            part.command_line = shlex.join(_relative(self.launch_command(self.profile.train_epochs)))
            part.fail(f"not run: {self.run_dir} exists (give a new --run-name)")
            return
        launched = self.launch_and_read(part, self.profile.train_epochs)
        if launched is None:
            return
        _, summary, records, steps, state, batch = launched
        part.figures.update({"run_dir": str(self.run_dir), "steps": len(steps), "global_batch_size": batch,
                             "latest_checkpoint": summary.get("latest_checkpoint"), "checkpoint_state": state,
                             "throughput": throughput(records, batch, evaluation_windows(self.run_dir)),
                             "process_group_backend": "nccl (Ray Train's TorchTrainer default with use_gpu; "
                                                      "configured, not read back)" if self.device == "cuda" else "gloo"})
        if not steps or steps != list(range(1, len(steps) + 1)):
            part.fail(f"train_log.jsonl does not hold steps 1..N once each (first {steps[:3]}, last {steps[-3:]})")
        elif state is None or state.get("step") != steps[-1]:
            part.fail(f"the latest checkpoint's train_state.json ({state}) is not at the last logged step {steps[-1]}")
        elif not (state.get("epoch") == self.profile.train_epochs - 1 and state.get("epoch_complete")):
            part.fail(f"the run did not finish epoch {self.profile.train_epochs - 1}: {state}")

    def resume(self, part: PartResult) -> None:
        trained = self.results.get("train")
        if trained is None or trained.status != "ok":
            part.command_line = shlex.join(_relative(self.launch_command(self.profile.resume_epochs)))
            part.fail("not run: the train part did not succeed, so there is no checkpoint to resume from")
            return
        saved = int(trained.figures["steps"])
        resume_started = time.time()
        launched = self.launch_and_read(part, self.profile.resume_epochs)
        if launched is None:
            return
        finished, summary, records, steps, state, batch = launched
        new = [r for r in records if int(r["step"]) > saved]
        part.figures.update({"run_dir": str(self.run_dir), "resumed_from_step": saved,
                             "steps": len(steps), "new_steps": len(new), "global_batch_size": batch,
                             "latest_checkpoint": summary.get("latest_checkpoint"), "checkpoint_state": state,
                             "throughput": throughput(new, batch, evaluation_windows(self.run_dir))})
        before = [r for r in records if int(r["step"]) <= saved]
        if f"resuming at step {saved}:" not in finished.stderr:
            part.fail(f"the worker did not log 'resuming at step {saved}:'")
        elif steps != list(range(1, len(steps) + 1)):
            part.fail("train_log.jsonl does not hold every step once after the resume "
                      f"({len(steps)} lines, {len(set(steps))} distinct steps, last {steps[-3:]})")
        elif not new:
            part.fail(f"no step after {saved} was logged")
        elif any(float(r["time"]) >= resume_started for r in before) or any(
                float(r["time"]) < resume_started for r in new):
            part.fail(f"steps up to {saved} were re-run, or steps after it predate the resume")
        elif state is None or state.get("step") != steps[-1]:
            part.fail(f"the latest checkpoint's train_state.json ({state}) is not at the last logged step {steps[-1]}")
        elif not (state.get("epoch") == self.profile.resume_epochs - 1 and state.get("epoch_complete")):
            part.fail(f"the resumed run did not finish epoch {self.profile.resume_epochs - 1}: {state}")

    def fp16_run(self) -> tuple[str, str]:
        """(precision the fp16 part trains in, why): fp16 on CUDA; on a CPU, which DeepSpeed refuses
        fp16 on, the check's own precision, so that the CPU simulation still runs the part."""
        if self.device == "cuda":
            return "fp16", "DeepSpeed fp16 with dynamic loss scaling"
        precision = self.args.precision if self.args.precision != "fp16" else "fp32"
        return precision, f"CPU simulation: fp16 needs a GPU (DeepSpeed refuses it on this CPU); ran in {precision}"

    def train_fp16(self, part: PartResult) -> None:
        """A new run in fp16 for fp16_epochs, without the evaluation actor: it starts, its dynamic
        loss scale settles (steps with an overflow are skipped by DeepSpeed), its losses stay finite
        and it writes a checkpoint of its last step."""
        precision, note = self.fp16_run()
        run_name = f"{self.run_name}-fp16"
        part.figures.update({"precision": precision, "note": note, "run_dir": str(self.runs / run_name)})
        launched = self.launch_and_read(part, self.profile.fp16_epochs, precision, run_name,
                                        extra=("eval.enabled=false",), evaluated=False)
        if launched is None:
            return
        _, summary, records, steps, state, batch = launched
        losses = [float(r["loss"]) for r in records]
        part.figures.update({"steps": len(steps), "global_batch_size": batch, "checkpoint_state": state,
                             "latest_checkpoint": summary.get("latest_checkpoint"),
                             "throughput": throughput(records, batch),
                             "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None})
        if not steps or steps != list(range(1, len(steps) + 1)):
            part.fail(f"train_log.jsonl does not hold steps 1..N once each (first {steps[:3]}, last {steps[-3:]})")
        elif not all(math.isfinite(value) for value in losses):
            part.fail("a logged loss is not finite")
        elif state is None or state.get("step") != steps[-1]:
            part.fail(f"the latest checkpoint's train_state.json ({state}) is not at the last logged step {steps[-1]}")

    def _global_batch(self) -> int:
        for value in self.profile.overrides:
            if value.startswith("optim.global_batch_size="):
                return int(value.split("=", 1)[1])
        return 128

    # ---- the whole check

    def run(self) -> int:
        self.output.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        print(f"gpu_check: profile {self.profile.name} on {self.device}, precision {self.args.precision}, "
              f"budget {self.budget_s:.0f} s, output {self.output}", flush=True)
        self.machine = machine_info(self.device == "cuda")
        if {"train", "resume"} & set(self.parts):
            if self.ray_address:
                self.metrics_targets, self.metrics_note = cluster_metrics_targets(self.ray_address)
            else:
                self.metrics_targets = [f"127.0.0.1:{self.metrics_port}"]
                self.metrics_note = "the local Ray launch.py starts, given monitoring.metrics_export_port"
        self.write()
        speed_runs = dict(zip(("model_speed_b128", "model_speed_b512"), self.profile.model_speed))
        for name in self.parts:
            part = self.results[name] = PartResult(name)
            try:
                if name == "precision_probe":
                    self.precision_probe(part)
                elif name in speed_runs:
                    self.model_speed(part, *speed_runs[name])
                elif name == "train_fp16":
                    self.train_fp16(part)
                elif name == "compile":
                    self.compile(part)
                elif name == "eval_speed":
                    self.eval_speed(part)
                elif name == "train":
                    self.train(part)
                elif name == "resume":
                    self.resume(part)
            except Exception as error:  # noqa: BLE001 - one part's bug must not lose the others' figures
                part.fail(f"gpu_check error: {type(error).__name__}: {error}")
            print(f"gpu_check: {name}: {part.status}" + (f" ({part.reason})" if part.reason else "")
                  + (f" in {part.wall_s} s" if part.wall_s is not None else ""), flush=True)
            self.write()
        failed = [name for name, part in self.results.items() if part.status != "ok"]
        self.write(final=True)
        print(f"gpu_check: {'all parts ok' if not failed else 'FAILED: ' + ', '.join(failed)}; "
              f"{self.output / 'gpu_check.json'}, {self.output / 'gpu_check.md'}", flush=True)
        return EXIT_OK if not failed else EXIT_PART_FAILED

    def summary(self, final: bool) -> dict[str, Any]:
        failed = [n for n, p in self.results.items() if p.status != "ok"]
        return {
            "check": "gpu_check", "profile": self.profile.name, "device": self.device,
            "precision": self.args.precision, "allow_cpu": self.args.allow_cpu,
            "command": shlex.join(_relative([sys.executable, *sys.argv])),
            "status": ("ok" if not failed else "failed") if final else "running",
            "failed_parts": failed, "budget_s": self.budget_s,
            "wall_s": round(time.perf_counter() - self.started, 1), "run_name": self.run_name,
            "output": str(self.output), "ray_address": self.ray_address or None, "machine": self.machine,
            "parts": {name: asdict(part) for name, part in self.results.items()},
        }

    def write(self, final: bool = False) -> None:
        summary = self.summary(final)
        _write_atomic(self.output / "gpu_check.json", json.dumps(summary, indent=2) + "\n")
        _write_atomic(self.output / "gpu_check.md", render_markdown(summary))


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _relative(command: Sequence[str]) -> list[str]:
    """Commands as a reader would type them: `python`, paths relative to the repository."""
    out = []
    for i, arg in enumerate(command):
        if i == 0 and arg == sys.executable:
            out.append("python")
            continue
        for prefix in (f"{ROOT}/",):
            arg = arg.replace(prefix, "")
        out.append(arg)
    return out


# --------------------------------------------------------------------------------------------------
# The markdown table
# --------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".1f", suffix: str = "") -> str:
    if value is None or isinstance(value, bool):
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:{spec}}{suffix}"
    return str(value)


def render_markdown(summary: dict[str, Any]) -> str:
    """Tables for docs/benchmarks.md: the machine line, each part's status and command, then the
    figures of the trainer, model_speed and eval_speed parts that ran."""
    m = summary["machine"]
    parts: dict[str, dict[str, Any]] = summary["parts"]
    date = (m.get("date") or "")[:10]
    lines = [f"### GPU acceptance run (`make gpu-check`), {date}", ""]
    if summary["device"] != "cuda":
        lines += ["**CPU simulation (`--allow-cpu`), for testing the script: not GPU figures.**", ""]
    gpu = m.get("gpu") or "no GPU"
    lines += [
        f"**Machine.** {gpu}" + (f" ({_fmt(m.get('gpu_memory_gib'))} GiB)" if m.get("gpu_memory_gib") else "")
        + (f", driver {m['driver_version']} (CUDA {m.get('driver_cuda_version')})" if m.get("driver_version") else "")
        + f"; {m.get('cpu')}, {m.get('cpu_count')} CPUs, {_fmt(m.get('memory_gib'))} GiB RAM; torch {m.get('torch')}"
        f" (CUDA {m.get('torch_built_with_cuda')}), Ray {m.get('ray')}, DeepSpeed {m.get('deepspeed')},"
        f" Python {m.get('python')}; commit {(m.get('git_commit') or 'unknown')[:10]}"
        + (" with local changes" if m.get("git_dirty") else "") + ".",
        "",
        f"**Command.** `{summary['command']}` (profile {summary['profile']}, precision {summary['precision']},"
        f" budget {summary['budget_s']:.0f} s): status **{summary['status']}** in {summary['wall_s']:.0f} s.",
        "",
        "| part | status | wall | timeout |",
        "|---|---|---|---|",
    ]
    for name, p in parts.items():
        status = p["status"] + (f": {p['reason']}" if p["reason"] else "")
        lines.append(f"| {name} | {status} | {_fmt(p['wall_s'], '.0f', ' s')} | {_fmt(p['timeout_s'], '.0f', ' s')} |")
    lines += ["", "Commands (from the repository root):", "", "```"]
    lines += [f"# {name}\n{p['command_line']}" for name, p in parts.items() if p["command_line"]]
    lines += ["```", ""]

    probe = (parts.get("precision_probe") or {}).get("figures") or {}
    if probe.get("cases"):
        lines += [f"Precision probe (`bench/precision_probe.py`, batch {probe.get('batch')}, {probe.get('device')}"
                  + (f", cuDNN {probe.get('cudnn')}" if probe.get("cudnn") else "")
                  + "): relative error against float32 weights, forward and backward:", "",
                  "| precision | case | status | values (relative error) | gradient norms (relative error) | cuDNN RNN calls |",
                  "|---|---|---|---|---|---|"]
        for case in probe["cases"]:
            values = ", ".join(f"{k} {v:.1e}" for k, v in (case.get("relative_error") or {}).items())
            grads = ", ".join(f"{k} {v:.1e}" for k, v in (case.get("grad_norm_relative_error") or {}).items())
            status = case.get("status", "") + (f": {'; '.join(case['failures'])}" if case.get("failures") else "")
            lines.append(f"| {case.get('precision')} | {case.get('case')} | {status} | {values} | {grads} "
                         f"| {_fmt(case.get('cudnn_rnn_calls'), 'd')} |")
        lines.append("")

    runs = [(n, parts[n]) for n in ("train", "resume", "train_fp16") if n in parts and parts[n].get("figures")]
    if runs:
        lines += [
            "Trainer (`trainer/launch.py`, 1 worker" + (" with 0.5 GPU and the evaluation actor on the other 0.5, NCCL"
                                                       if summary["device"] == "cuda" else " on CPU, gloo")
            + f", {summary['precision']} (train_fp16: its own precision); medians over the steps after warm-up "
              "that no evaluation overlapped):",
            "",
            "| run | precision | steps | samples/s (step + data wait) | step time | data wait | steps excluded "
            "(warm-up / during evaluations) | launcher wall_s / process wall | best dev rsum | test rsum (all) "
            "| GPU memory used, max (nvidia-smi, whole device) | worker max allocated (Ray metric) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, p in runs:
            f = p["figures"]
            t = f.get("throughput") or {}
            steps = f.get("steps")
            if name == "resume" and f.get("resumed_from_step") is not None:
                steps = f"{f.get('resumed_from_step')} → {f.get('steps')}"
            smi = f.get("gpu_memory_nvidia_smi") or {}
            ray_m = f.get("ray_metrics") or {}
            precision = f.get("precision") or summary["precision"]
            lines.append(
                f"| {name} | {precision} | {_fmt(steps, 'd')} | {_fmt(t.get('samples_per_s_median'), '.0f')} "
                f"| {_fmt(_ms(t.get('step_time_s_median')), '.1f', ' ms')} "
                f"| {_fmt(_ms(t.get('data_wait_s_median')), '.1f', ' ms')} "
                f"| {_fmt(t.get('warmup_steps_excluded'), 'd')} / {_fmt(t.get('steps_during_evaluations_excluded'), 'd')} "
                f"| {_fmt(f.get('launch_wall_s'), '.0f', ' s')} / {_fmt(p.get('wall_s'), '.0f', ' s')} "
                f"| {_fmt(f.get('best_dev_rsum'), '.1f')} | {_fmt(f.get('test_rsum_all'), '.1f')} "
                f"| {_fmt(_gib(smi.get('used_max_mib_any_gpu'), 2**10), '.1f', ' GiB')} "
                f"| {_fmt(ray_m.get('worker_max_allocated_gib'), '.1f', ' GiB')} |")
        lines.append("")
        notes = [f"{n}: {p['figures']['note']}" for n, p in runs if p["figures"].get("note")]
        if notes:
            lines += [*notes, ""]

    speeds = [parts[n] for n in ("model_speed_b128", "model_speed_b512") if n in parts and parts[n].get("figures")]
    if speeds:
        model = ("the full VSRN" if summary["profile"] == "paper"
                 else "the `--small` VSRN (D 256) of the CPU simulation")
        lines += [f"`bench/model_speed.py` (one optimizer step of {model}, no data loading; trainer: the worker's "
                  "DeepSpeed engine, weights cast as it casts them; autocast: float32 weights under torch.autocast):",
                  "", "| batch | path | precision | ms/step | pairs/s | peak GPU memory (max allocated) |",
                  "|---|---|---|---|---|---|"]
        for p in speeds:
            for r in p["figures"].get("results") or []:
                lines.append(f"| {_fmt(r.get('batch'), 'd')} | {_fmt(r.get('path'))} | {_fmt(r.get('precision'))} "
                             f"| {_fmt(_ms(r.get('seconds_per_step')), '.1f')} | {_fmt(r.get('pairs_per_second'), '.0f')} "
                             f"| {_fmt(r.get('peak_memory_gib'), '.1f', ' GiB')} |")
        lines.append("")

    compiled = ((parts.get("compile") or {}).get("figures") or {}).get("results") or []
    if compiled:
        lines += ["`bench/compile_speed.py` (the worker's step, eager against `model.compile: true`; one caption "
                  "bucket; compile = the warm-up's extra time):", "",
                  "| batch | loop | compile | ms/step | pairs/s | graphs | peak GPU memory |", "|---|---|---|---|---|---|---|"]
        for r in compiled:
            lines.append(f"| {_fmt(r.get('batch_size'), 'd')} | {r.get('loop')} | {_fmt(r.get('compile_s'), '.1f', ' s')} "
                         f"| {_fmt(r.get('ms_per_step'), '.1f')} | {_fmt(r.get('pairs_per_s'), '.0f')} "
                         f"| {_fmt(r.get('graphs'), 'd')} | {_fmt(r.get('peak_memory_gib'), '.1f', ' GiB')} |")
        lines.append("")

    if "eval_speed" in parts and parts["eval_speed"].get("figures", {}).get("vectorized_s") is not None:
        f = parts["eval_speed"]["figures"]
        memory = f.get("memory") or {}
        peak = (f"{memory['cuda_max_allocated_mib']:.0f} MiB CUDA max allocated, inputs included"
                if memory.get("cuda_max_allocated_mib") is not None
                else f"+{_fmt(memory.get('rss_extra_mib'), '.0f')} MiB RSS")
        runs_s = ", ".join(f"{x:.3f}" for x in f.get("vectorized_runs_s") or [])
        loop = (f"{f['loop_s']:.1f} s (extrapolated from {f['loop_queries']} images)" if f.get("loop_extrapolated")
                else f"{_fmt(f.get('loop_s'))} s")
        agreement = f.get("agreement") or {}
        lines += ["`bench/eval_speed.py` (recall protocol `all`):", "",
                  "| N x 5N, D | device | vectorized (min; runs) | reference loop | speed-up | rank mismatches | peak memory |",
                  "|---|---|---|---|---|---|---|",
                  f"| {f.get('images')} x {f.get('captions')}, {f.get('dim')} | {f.get('device')} "
                  f"| {f['vectorized_s']:.3f} s ({runs_s}) | {loop} | {_fmt(f.get('speedup'), '.0f', '×')} "
                  f"| i2t {agreement.get('i2t_rank_mismatches')}, t2i {agreement.get('t2i_rank_mismatches')} | {peak} |",
                  ""]
    return "\n".join(lines)


def _ms(seconds: Any) -> float | None:
    return None if not isinstance(seconds, (int, float)) else 1000.0 * seconds


def _gib(value: Any, per_gib: int) -> float | None:
    return None if not isinstance(value, (int, float)) else value / per_gib


# --------------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------------


def cuda_status() -> tuple[bool, str]:
    """(available, the one line saying why not). Warnings of a broken driver are silenced so that
    the no-CUDA exit prints exactly one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch

        available = bool(torch.cuda.is_available())
    return available, (f"gpu_check: CUDA is not available (torch {torch.__version__}, built with CUDA "
                       f"{torch.version.cuda}): this check needs an NVIDIA GPU (--allow-cpu --tiny only tests "
                       "the script on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Details: the module docstring (bench/gpu_check.py) and docs/benchmarks.md.")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"directory for the summary, logs, run and data (default: {DEFAULT_OUTPUT.relative_to(ROOT)}/)")
    parser.add_argument("--precision", choices=("bf16", "fp32", "fp16"), default="bf16",
                        help="precision of the train/resume and model_speed parts (default bf16; fp32 or bf16 "
                             "with --allow-cpu); the train_fp16 part always trains in fp16 on a GPU")
    parser.add_argument("--parts", default=",".join(PART_ORDER),
                        help="comma-separated parts to run, in the fixed order "
                             f"{', '.join(PART_ORDER)} (model_speed = both batches; resume needs train)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="total time budget in seconds, split between the parts (default: 480; 1500 with --tiny)")
    parser.add_argument("--run-name", default="", help="checkpoint.run_name, a new one (default: gpu-check-<timestamp>)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="for testing the script on a machine without a GPU: run on the CPU when CUDA is not "
                             "available (needs --tiny); the pinned run is without it")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny model, data and benchmark sizes (configs/tiny.yaml), for testing the script")
    return parser


def parse_parts(parser: argparse.ArgumentParser, value: str) -> list[str]:
    wanted: set[str] = set()
    for name in (v.strip() for v in value.split(",") if v.strip()):
        if name in PART_ALIASES:
            wanted.update(PART_ALIASES[name])
        elif name in PART_ORDER:
            wanted.add(name)
        else:
            parser.error(f"--parts: unknown part {name!r} (known: {', '.join(PART_ORDER)}, model_speed)")
    if "resume" in wanted and "train" not in wanted:
        parser.error("--parts: resume continues the run of the train part; select train too")
    if not wanted:
        parser.error("--parts: nothing selected")
    return [name for name in PART_ORDER if name in wanted]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.parts = parse_parts(parser, args.parts)
    available, why_not = cuda_status()
    if not available and not args.allow_cpu:
        print(why_not, file=sys.stderr)
        return EXIT_NO_CUDA
    if not available and not args.tiny:
        parser.error("--allow-cpu runs on the CPU only with --tiny (the paper-size check would take hours)")
    if not available and args.precision == "fp16":
        parser.error("--precision fp16 needs a GPU (DeepSpeed refuses fp16 on this CPU); use fp32 or bf16")
    profile = tiny_profile() if args.tiny else paper_profile()
    return Check(args, profile, "cuda" if available else "cpu").run()


if __name__ == "__main__":
    sys.exit(main())
