"""bench/gpu_check.py (`make gpu-check`), the GPU acceptance run, on a machine without CUDA.

Without CUDA the pinned command must stop at once with exit status 3 and one line on stderr
(nothing created, no Ray, no data): these tests run it for real on the CPU-only development
machines. The CPU simulation (`--allow-cpu --tiny`) exercises the whole orchestration (the
launcher as a subprocess, the resume, both benchmarks, the summary and the markdown) with tiny
sizes; it attaches to the session's Ray through RAY_ADDRESS, as the launcher tests do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


needs_no_cuda = pytest.mark.skipif(_cuda_available(), reason="checks the behaviour on a machine without CUDA")


def _env_without_ray() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


@needs_no_cuda
def test_without_cuda_it_exits_3_with_one_line_and_creates_nothing(tmp_path: Path) -> None:
    cwd, output = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(output)], cwd=cwd,
                            capture_output=True, text=True, timeout=120, env=_env_without_ray())
    assert result.returncode == 3, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "CUDA" in lines[0] and lines[0].startswith("gpu_check:"), result.stderr
    assert not output.exists()
    assert list(cwd.iterdir()) == []


@needs_no_cuda
def test_make_gpu_check_runs_the_script_and_fails_with_its_status_3(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    dry = subprocess.run(["make", "-n", "gpu-check", f"ARGS=--output {tmp_path / 'out'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert "bench/gpu_check.py --output" in dry.stdout
    if "pip install" in dry.stdout:
        pytest.skip("the virtual environment is not up to date: `make gpu-check` would install packages first")
    # make reports a failed recipe with its own status 2 and names the recipe's status ("Error 3").
    real = subprocess.run(["make", "--no-print-directory", "gpu-check", f"ARGS=--output {tmp_path / 'out'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env_without_ray())
    assert real.returncode == 2, (real.stdout, real.stderr)
    assert "Error 3" in real.stderr
    script_lines = [line for line in real.stderr.splitlines() if line.startswith("gpu_check:")]
    assert len(script_lines) == 1 and "CUDA is not available" in script_lines[0]
    assert not (tmp_path / "out").exists()


PIP_STANDIN = """import os, sys
with open(os.environ["PIP_CALLS_LOG"], "a") as log:
    log.write(" ".join(sys.argv) + "\\n")
sys.exit("pip is unavailable on this host (gpu_check test)")
"""


def _without_pip(root: Path, env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """`env` in which pip cannot run: `pip`, `pip3`... on PATH and `python -m pip` (a package on
    PYTHONPATH, ahead of site-packages) record the call in the returned log and fail, like a host
    without a package registry would (and worse: nothing can even try)."""
    calls = root / "pip-calls.txt"
    bin_dir, site = root / "bin", root / "site" / "pip"
    bin_dir.mkdir(parents=True)
    site.mkdir(parents=True)
    for name in ("pip", "pip3", f"pip{sys.version_info.major}.{sys.version_info.minor}"):
        script = bin_dir / name
        script.write_text(f"#!{sys.executable}\n" + PIP_STANDIN)
        script.chmod(0o755)
    (site / "__init__.py").write_text(PIP_STANDIN)
    (site / "__main__.py").write_text(PIP_STANDIN)
    path = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    python_path = os.pathsep.join(p for p in (str(root / "site"), env.get("PYTHONPATH", "")) if p)
    return {**env, "PATH": path, "PYTHONPATH": python_path, "PIP_CALLS_LOG": str(calls)}, calls


def test_the_pip_standin_records_and_fails(tmp_path: Path) -> None:
    env, calls = _without_pip(tmp_path, dict(os.environ))
    for command in (["pip", "install", "x"], [sys.executable, "-m", "pip", "install", "y"]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and "pip is unavailable" in result.stderr
    assert len(calls.read_text().splitlines()) == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_simulation_runs_every_part_without_pip_and_writes_the_summary(ray_local: Any, tmp_path: Path) -> None:
    # The same orchestration as the GPU run, tiny and on CPU, on a host where pip cannot run (the
    # GPU host has no package registry); attaches to the session's Ray (2 CPUs: the worker's 1 CPU
    # and the evaluator's 0.5 fit) to skip Ray start-ups.
    output = tmp_path / "out"
    env, pip_calls = _without_pip(tmp_path / "nopip", {**os.environ,
                                                        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    result = subprocess.run([sys.executable, str(SCRIPT), "--allow-cpu", "--tiny", "--precision", "fp32",
                             "--output", str(output)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=1500, env=env)
    summary = json.loads((output / "gpu_check.json").read_text())
    statuses = {name: (part["status"], part["reason"], part["stderr_tail"][-5:])
                for name, part in summary["parts"].items()}
    assert result.returncode == 0, (statuses, result.stdout[-3000:], result.stderr[-3000:])
    assert not pip_calls.exists(), pip_calls.read_text()  # nothing on its path called pip
    assert summary["status"] == "ok" and summary["device"] == "cpu" and summary["profile"] == "tiny"
    assert list(summary["parts"]) == ["precision_probe", "model_speed_b128", "model_speed_b512", "train", "resume",
                                      "train_fp16", "eval_speed", "compile"]
    assert all(part["status"] == "ok" for part in summary["parts"].values()), statuses
    machine = summary["machine"]
    assert machine["cpu_count"] and machine["torch"] and machine["ray"] and machine["deepspeed"] and machine["date"]

    probe = summary["parts"]["precision_probe"]["figures"]
    cases = {(c["precision"], c["case"]) for c in probe["cases"]}
    assert cases == {(p, c) for p in ("bf16", "fp16")
                     for c in ("gru_image_gsr", "gru_text_padded", "gru_decoder_steps", "model")}
    assert all(c["relative_error"] and all(v < 0.1 for v in c["relative_error"].values()) for c in probe["cases"])

    train, resume = summary["parts"]["train"]["figures"], summary["parts"]["resume"]["figures"]
    # 64 images x 5 captions / 32 per step = 10 steps per epoch: 2 epochs, then a 3rd after the resume.
    assert train["steps"] == 20 and train["checkpoint_state"]["step"] == 20
    measured = train["throughput"]
    assert measured["steps_measured"] > 0 and measured["samples_per_s_median"] > 0
    # The evaluations of the 2 checkpoints ran beside training; steps that overlap them are left out.
    assert measured["evaluations_seen"] >= 1
    assert measured["steps_measured"] + measured["warmup_steps_excluded"] \
        + measured["steps_during_evaluations_excluded"] == 20
    assert train["best_dev_rsum"] is not None and train["metrics"]["all"]["rsum"] > 0
    assert train["ray_metrics"]["scrapes_ok"] > 0  # the cluster's metrics endpoint, found through RAY_ADDRESS
    assert resume["resumed_from_step"] == 20 and resume["steps"] == 30 and resume["new_steps"] == 10
    run_dir = Path(train["run_dir"])
    steps = [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
    assert "--set checkpoint.run_name=" + summary["run_name"] in summary["parts"]["resume"]["command_line"]

    fp16 = summary["parts"]["train_fp16"]["figures"]
    # On a CPU the fp16 part runs in the check's precision and says so; on a GPU it trains in fp16.
    assert fp16["precision"] == "fp32" and "fp16 needs a GPU" in fp16["note"]
    assert fp16["steps"] == 10 and fp16["checkpoint_state"]["step"] == 10
    assert "distributed.precision=fp32" in summary["parts"]["train_fp16"]["command_line"]
    assert "eval.enabled=false" in summary["parts"]["train_fp16"]["command_line"]

    speeds = [summary["parts"][n]["figures"] for n in ("model_speed_b128", "model_speed_b512")]
    assert [s["batch"] for s in speeds] == [4, 8]
    for speed in speeds:
        assert [(r["path"], r["precision"]) for r in speed["results"]] == [("trainer", "fp32"), ("autocast", "fp32")]
        assert all(r["pairs_per_second"] > 0 for r in speed["results"])
    assert summary["parts"]["eval_speed"]["figures"]["vectorized_s"] > 0
    compiled = {r["loop"]: r for r in summary["parts"]["compile"]["figures"]["results"]}
    assert sorted(compiled) == ["compiled", "eager"] and compiled["compiled"]["graphs"] == 1

    markdown = (output / "gpu_check.md").read_text()
    assert markdown.startswith("### GPU acceptance run (`make gpu-check`)")
    assert "CPU simulation" in markdown and "| train | ok |" in markdown and "| resume | fp32 | 20 → 30 |" in markdown
    assert "| bf16 | gru_text_padded | ok |" in markdown and "| 8 | trainer | fp32 |" in markdown
    assert "| 4 | compiled |" in markdown
    assert (output / "logs" / "train.stderr.txt").is_file()


def test_make_reinstalls_torch_when_torch_spec_changes() -> None:
    # A CPU venv asked for a CUDA build (same version, another index): before, the stamp tracked
    # setup.py only, nothing was reinstalled and the check exited 3 on the +cpu torch.
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    spec = "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
    dry = subprocess.run(["make", "-n", "gpu-check", f"TORCH_SPEC={spec}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    uninstall = next(i for i, line in enumerate(lines) if "pip uninstall" in line and "torch" in line)
    install = next(i for i, line in enumerate(lines) if f"pip install --quiet {spec}" in line)
    project = next(i for i, line in enumerate(lines) if 'pip install --quiet -e ".[test]"' in line)
    assert uninstall < install < project < next(i for i, line in enumerate(lines) if "bench/gpu_check.py" in line)


GRANDCHILD = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
print("part started", file=sys.stderr, flush=True)
time.sleep(120)
"""


def test_a_part_past_its_timeout_is_ended_with_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What keeps one hanging part (a launcher and its local Ray) from holding the GPU for the
    # next ones: the part's whole process group is terminated at its timeout.
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    finished = gpu_check.run_logged([sys.executable, "-c", GRANDCHILD], 3.0, tmp_path / "out.txt",
                                    tmp_path / "err.txt", dict(os.environ))
    assert finished.timed_out and finished.returncode is None
    assert finished.wall_s < 20 and "part started" in finished.stderr
    grandchild = int(finished.stdout.split()[0])
    with pytest.raises(ProcessLookupError):
        for _ in range(50):  # reaped by init shortly after the signal
            os.kill(grandchild, 0)
            time.sleep(0.1)
