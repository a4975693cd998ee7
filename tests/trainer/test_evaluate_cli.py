"""Tests for trainer/evaluate.py, the recall evaluation CLI.

The CLI runs as a real subprocess (``python trainer/evaluate.py ...`` from the repository root)
for the success paths and for representative failures; the remaining error messages are checked
by calling ``main(argv)`` in-process, which is the same code without the interpreter start-up.
Expected metrics come from the library run on independently loaded arrays.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.evaluate import main, write_json_atomic
from trainer.evaluation import evaluate_embeddings, evaluate_similarities

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path("trainer") / "evaluate.py"
PINNED_KEYS = [
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
]


def dyadic_embeddings(rng: np.random.Generator, num_images: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 embeddings in multiples of 1/8: all products are exact, so the subprocess and the
    in-process library compute bit-identical similarities whatever their blocking or threads."""
    images = rng.integers(-8, 9, size=(num_images, dim)).astype(np.float32) / 8
    noise = rng.integers(-16, 17, size=(5 * num_images, dim)).astype(np.float32) / 8
    return images, np.repeat(images, 5, axis=0) + noise


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("evaluate_cli")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (num_images, dim) in {"a": (5000, 8), "b": (5000, 8), "d12": (5000, 12), "small": (300, 8)}.items():
        images, captions = dyadic_embeddings(rng, num_images, dim)
        paths[name] = directory / f"{name}.npz"
        np.savez(paths[name], images=images, captions=captions)
    images, captions = dyadic_embeddings(rng, 300, 8)
    paths["short_captions"] = directory / "short_captions.npz"
    np.savez(paths["short_captions"], images=images, captions=captions[:1400])
    paths["no_captions"] = directory / "no_captions.npz"
    np.savez(paths["no_captions"], images=images, caps=captions)
    for name in ("sa", "sb"):
        images, captions = dyadic_embeddings(rng, 100, 8)
        paths[name] = directory / f"{name}.npy"
        np.save(paths[name], images @ captions.T)
    paths["sims_wrong_shape"] = directory / "sims_wrong_shape.npy"
    np.save(paths["sims_wrong_shape"], np.zeros((100, 400), np.float32))
    return paths


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as archive:
        return archive["images"], archive["captions"]


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_pinned_layout(metrics: dict, protocols: list[str]) -> None:
    assert list(metrics) == protocols
    for protocol in protocols:
        expected_keys = PINNED_KEYS + (["folds"] if protocol == "1k-5fold" else [])
        assert list(metrics[protocol]) == expected_keys
        for fold in metrics[protocol].get("folds", []):
            assert list(fold) == PINNED_KEYS
    if "1k-5fold" in metrics:
        assert len(metrics["1k-5fold"]["folds"]) == 5


# ----------------------------------------------------------------------------------------------
# Success paths, as a subprocess


def test_embeddings_both_protocols(files: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "metrics.json"
    result = run_cli("--embeddings", files["a"], "--protocol", "1k-5fold", "--protocol", "all", "--output", output)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(output.read_text())
    assert_pinned_layout(metrics, ["1k-5fold", "all"])
    model = load_npz(files["a"])
    assert metrics == {p: evaluate_embeddings([model], p) for p in ("1k-5fold", "all")}
    # The readable table: a row per protocol and per fold.
    row_labels = [line.split("|")[0].strip() for line in result.stdout.splitlines() if "|" in line]
    expected_rows = ["1k-5fold", "fold 0", "fold 4", "all"]
    assert [label for label in row_labels if label in expected_rows] == expected_rows
    assert f"{metrics['all']['rsum']:.2f}" in result.stdout
    assert "Traceback" not in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_embeddings_ensemble(files: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "metrics.json"
    result = run_cli("--embeddings", files["a"], "--embeddings", files["b"], "--protocol", "all",
                     "--protocol", "1k-5fold", "--output", output)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(output.read_text())
    assert_pinned_layout(metrics, ["all", "1k-5fold"])
    models = [load_npz(files["a"]), load_npz(files["b"])]
    assert metrics == {p: evaluate_embeddings(models, p) for p in ("all", "1k-5fold")}
    assert metrics["all"] != evaluate_embeddings(models[:1], "all")


def test_similarities_ensemble(files: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "metrics.json"
    result = run_cli("--sims", files["sa"], "--sims", files["sb"], "--protocol", "all", "--output", output)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(output.read_text())
    assert_pinned_layout(metrics, ["all"])
    sa, sb = np.load(files["sa"]), np.load(files["sb"])
    assert metrics == {"all": evaluate_similarities([(sa + sb) / 2], "all")}


# ----------------------------------------------------------------------------------------------
# A failure as a subprocess: exit status 2, one clear line, no traceback, no output file


def test_bad_input_in_subprocess(files: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "metrics.json"
    result = run_cli("--embeddings", files["no_captions"], "--protocol", "all", "--output", output)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert re.fullmatch(
        r"evaluate.py: error: \S*no_captions.npz: missing key 'captions'; the archive holds "
        r"\['images', 'caps'\], expected 'images' \(N, D\) and 'captions' \(5N, D\)",
        error_lines[0],
    ), error_lines[0]
    assert not output.exists()


# ----------------------------------------------------------------------------------------------
# The other messages, through main() in-process


@pytest.mark.parametrize(
    ("inputs", "protocol", "message"),
    [
        (["--embeddings", "short_captions"], "all",
         r"short_captions.npz: captions must have 5 x images rows: images has shape \(300, 8\), so 1500 "
         r"captions are expected, but captions has shape \(1400, 8\)"),
        (["--embeddings", "a", "--embeddings", "d12"], "all",
         r"ensemble members differ in dimension D: \S*a.npz images have shape \(5000, 8\), "
         r"\S*d12.npz images have shape \(5000, 12\)"),
        (["--embeddings", "small"], "1k-5fold",
         r"small.npz: protocol '1k-5fold' needs at least 5000 images .* got N=300"),
        (["--sims", "sa"], "1k-5fold",
         r"sa.npy: protocol '1k-5fold' needs at least 5000 images \(5 folds of 1000\), got N=100"),
        (["--embeddings", "a", "--embeddings", "small"], "all", r"ensemble members differ in number of images N"),
        (["--embeddings", "no_captions"], "all", r"no_captions.npz: missing key 'captions'"),
        (["--embeddings", "missing.npz"], "all", r"missing.npz: no such file"),
        (["--embeddings", "sa"], "all", r"sa.npy: expected an .npz archive with arrays images and captions, "
                                         r"got a single array of shape \(100, 500\)"),
        (["--sims", "a"], "all", r"a.npz: expected an .npy file with one \(N, 5N\) array, got an npz archive"),
        (["--sims", "sims_wrong_shape"], "all",
         r"sims_wrong_shape.npy: similarity matrix must have shape \(N, 5N\) .* got \(100, 400\)"),
        (["--sims", "sa", "--sims", "sims_wrong_shape"], "all",
         r"sims_wrong_shape.npy: similarity matrix must have shape"),
    ],
)
def test_bad_input_messages(
    files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    inputs: list[str],
    protocol: str,
    message: str,
) -> None:
    output = tmp_path / "metrics.json"
    args = [str(files[value]) if value in files else str(tmp_path / value) if value.endswith(".npz") else value
            for value in inputs]
    assert main([*args, "--protocol", protocol, "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("evaluate.py: error: ")
    assert re.search(message, captured.err), captured.err
    assert not output.exists()


def test_usage_errors_exit_2(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["--embeddings", str(files["a"]), "--sims", str(files["sa"]), "--protocol", "all"],
         "not allowed with argument"),
        (["--protocol", "all"], "one of the arguments --embeddings --sims is required"),
        (["--sims", str(files["sa"])], "the following arguments are required: --protocol"),
        (["--sims", str(files["sa"]), "--protocol", "5k"], "invalid choice: '5k'"),
        (["--sims", str(files["sa"]), "--protocol", "all", "--block-size", "0"], "--block-size must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_single_similarity_matrix_and_repeated_protocol(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "metrics.json"
    assert main(["--sims", str(files["sa"]), "--protocol", "all", "--protocol", "all", "--output", str(output)]) == 0
    assert json.loads(output.read_text()) == {"all": evaluate_similarities([np.load(files["sa"])], "all")}
    assert capsys.readouterr().out.count("\nall ") == 1


def test_missing_output_directory_fails_before_evaluating(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "nowhere" / "metrics.json"
    assert main(["--sims", str(files["sa"]), "--protocol", "all", "--output", str(output)]) == 2
    captured = capsys.readouterr()
    assert "directory" in captured.err and "does not exist" in captured.err
    assert captured.out == ""


def test_failed_run_keeps_the_previous_metrics_file(files: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "metrics.json"
    output.write_text('{"old": true}\n')
    assert main(["--embeddings", str(files["small"]), "--protocol", "1k-5fold", "--output", str(output)]) == 2
    assert output.read_text() == '{"old": true}\n'


def test_write_json_atomic_replaces_whole_files_only(tmp_path: Path) -> None:
    output = tmp_path / "metrics.json"
    output.write_text('{"old": true}\n')
    with pytest.raises(TypeError):
        write_json_atomic(output, {"all": {"rsum": object()}})  # fails half-way through dumping
    assert output.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]

    write_json_atomic(output, {"all": {"rsum": 1.5}})
    assert json.loads(output.read_text()) == {"all": {"rsum": 1.5}}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask
