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
from typing import Any

import numpy as np
import pytest
from eval_run_helpers import (
    EvalData,
    build_eval_data,
    make_model,
    write_checkpoint,
    write_run_config,
)

from trainer.evaluator.checkpoint_eval import evaluate_checkpoint
from trainer.config import EvalConfig
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


# ------------------------------------------------------------------------------------------------
# --checkpoint and --watch: model checkpoints on sharded splits (trainer/evaluator/checkpoint_eval.py)
# ------------------------------------------------------------------------------------------------

RUN_DEV_IMAGES = 20
VOLATILE_KEYS = ("evaluated_at", "elapsed_s")


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    return build_eval_data(tmp_path_factory.mktemp("evaluate_cli_shards"))


def make_cli_run(root: Path, data: EvalData, corrupt_second: bool = False) -> Path:
    """RUN_DIR with config.yaml and two checkpoints of different models (steps 10 and 20)."""
    run = root / "run"
    write_run_config(run, str(data.dev.shards), str(data.test.shards), ["1k-5fold", "all"], RUN_DEV_IMAGES)
    for index, seed in enumerate((1, 2)):
        directory = write_checkpoint(run, f"checkpoint_{index + 1:06d}", make_model(data.vocab, seed), data.vocab,
                                     step=10 * (index + 1))
        if corrupt_second and index == 1:
            weights = directory / "inference" / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
    return run


def stable(payload: dict) -> dict:
    return {key: value for key, value in payload.items() if key not in VOLATILE_KEYS}


def assert_same_payload(found: Any, expected: Any, where: str = "metrics") -> None:
    """Equal structure and values, floats to 1e-6 (a separate process may sum in another order)."""
    if isinstance(expected, dict):
        assert isinstance(found, dict) and list(found) == list(expected), where
        for key in expected:
            assert_same_payload(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, float):
        assert found == pytest.approx(expected, abs=1e-6), where
    else:
        assert found == expected, where


def test_checkpoint_mode_writes_metrics_beside_the_checkpoint(eval_data: EvalData, tmp_path: Path) -> None:
    run = make_cli_run(tmp_path, eval_data)
    checkpoint = run / "checkpoint_000001"
    result = run_cli("--checkpoint", checkpoint, "--data", eval_data.test.shards, "--dev", eval_data.dev.shards)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^dev \(all, 20 images\) +\|", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^test all +\|", result.stdout, re.MULTILINE)
    assert "skipped 1k-5fold: needs at least 5000 test images" in result.stdout

    # The run's config.yaml supplies the eval settings (20 dev images, both protocols).
    metrics = json.loads((checkpoint / "metrics.json").read_text())
    expected = evaluate_checkpoint(str(checkpoint), str(eval_data.dev.shards), str(eval_data.test.shards),
                                   EvalConfig(dev_images=RUN_DEV_IMAGES, batch_size=16, qualitative_queries=0))
    assert_same_payload(stable(metrics), stable(expected))
    assert list(metrics["test"]["all"]) == PINNED_KEYS
    best = json.loads((run / "best.json").read_text())
    assert best["checkpoint"] == str(checkpoint) and best["dev_rsum"] == metrics["dev_rsum"]
    # The run's history got the checkpoint's line, as the evaluation worker records it.
    lines = [json.loads(line) for line in (run / "evaluations.jsonl").read_text().splitlines()]
    assert [(line["checkpoint"], line["dev_rsum"]) for line in lines] == [("checkpoint_000001", metrics["dev_rsum"])]


def test_checkpoint_mode_output_file_and_protocols(
    eval_data: EvalData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An inference checkpoint directory itself, outside any run; --output instead of beside it.
    inference = write_checkpoint(tmp_path, "checkpoint_x", make_model(eval_data.vocab, 3), eval_data.vocab,
                                 step=1, complete=False) / "inference"
    output = tmp_path / "out.json"
    assert main(["--checkpoint", str(inference), "--data", str(eval_data.test.shards), "--protocol", "all",
                 "--batch-size", "8", "--output", str(output)]) == 0
    payload = json.loads(output.read_text())
    assert payload["checkpoint"] == str(inference) and payload["step"] is None
    assert payload["dev"] is None and payload["skipped"] == {} and list(payload["test"]) == ["all"]
    expected = evaluate_checkpoint(str(inference), None, str(eval_data.test.shards),
                                   EvalConfig(test_protocols=["all"], batch_size=8))
    assert_same_payload(stable(payload), stable(expected))
    assert not (inference / "metrics.json").exists() and not (tmp_path / "best.json").exists()
    assert not list(tmp_path.rglob("evaluations.jsonl"))  # not a run: no history anywhere
    assert "test all" in capsys.readouterr().out


def test_checkpoint_mode_bad_inputs(eval_data: EvalData, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_cli_run(tmp_path, eval_data, corrupt_second=True)
    for argv, message in [
        (["--checkpoint", str(run / "checkpoint_000002"), "--data", str(eval_data.test.shards)],
         r"model\.safetensors: not a readable safetensors file"),
        (["--checkpoint", str(run / "checkpoint_000001"), "--data", str(tmp_path / "nothing")],
         r"nothing/manifest\.json: no manifest"),
        (["--checkpoint", str(tmp_path / "missing"), "--dev", str(eval_data.dev.shards)],
         r"missing: no inference checkpoint"),
    ]:
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.startswith("evaluate.py: error: "), captured
        assert re.search(message, captured.err), captured.err
    assert not list(run.rglob("metrics.json")) and not list(run.rglob("eval_error.json"))


def test_checkpoint_and_watch_usage_errors(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["--checkpoint", "c"], "--checkpoint needs --data (test shards) and/or --dev"),
        (["--checkpoint", "c", "--watch", "r"], "argument --watch: not allowed with argument --checkpoint"),
        (["--embeddings", str(files["a"]), "--checkpoint", "c", "--data", "d"], "not allowed with argument"),
        (["--embeddings", str(files["a"]), "--protocol", "all", "--data", "d"], "--data: only with --checkpoint"),
        (["--watch", "r", "--output", "m.json"], "--output: not with --watch"),
        (["--checkpoint", "c", "--data", "d", "--retry-failed"], "--retry-failed: only with --watch"),
        (["--watch", "r", "--dev-images", "0"], "--dev-images must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv


def test_watch_evaluates_the_rest_and_exits_non_zero_on_a_failure(
    eval_data: EvalData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_cli_run(tmp_path, eval_data, corrupt_second=True)
    result = run_cli("--watch", run)  # shards and settings from RUN/config.yaml
    assert result.returncode == 3, result.stderr
    assert f"{run / 'checkpoint_000001'} (step 10): dev rsum" in result.stdout
    assert f"{run / 'checkpoint_000002'} (step 20): FAILED: CheckpointError" in result.stdout
    assert "evaluated 2 checkpoint(s), 1 failed" in result.stdout
    assert "test all" in result.stderr  # the recall table is logged
    first = json.loads((run / "checkpoint_000001" / "metrics.json").read_text())
    assert first["data"]["dev_images"] == RUN_DEV_IMAGES
    assert json.loads((run / "best.json").read_text())["checkpoint"] == str(run / "checkpoint_000001")
    assert "model.safetensors" in json.loads((run / "checkpoint_000002" / "eval_error.json").read_text())["error"]

    # Evaluated and failed checkpoints are skipped on the next run (exit 0: nothing failed now) ...
    before = (run / "checkpoint_000001" / "metrics.json").read_bytes()
    assert main(["--watch", str(run)]) == 0
    assert "evaluated 0 checkpoint(s), 0 failed" in capsys.readouterr().out
    assert (run / "checkpoint_000001" / "metrics.json").read_bytes() == before
    # ... unless failures are to be retried.
    assert main(["--watch", str(run), "--retry-failed"]) == 3
    assert "evaluated 1 checkpoint(s), 1 failed" in capsys.readouterr().out


def test_watch_without_shards_or_with_unreadable_ones(
    eval_data: EvalData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = make_cli_run(tmp_path, eval_data)
    assert main(["--watch", str(run), "--data", str(tmp_path / "nothing")]) == 2
    assert "no manifest" in capsys.readouterr().err
    (run / "config.yaml").unlink()
    assert main(["--watch", str(run)]) == 2
    assert "no dev or test shards" in capsys.readouterr().err
    assert not list(run.rglob("metrics.json")) and not list(run.rglob("eval_error.json"))
    # Without config.yaml the command line gives everything.
    assert main(["--watch", str(run), "--data", str(eval_data.test.shards), "--dev", str(eval_data.dev.shards),
                 "--dev-images", "10", "--protocol", "all"]) == 0
    metrics = json.loads((run / "checkpoint_000002" / "metrics.json").read_text())
    assert metrics["data"]["dev_images"] == 10 and metrics["skipped"] == {}


def test_watch_an_s3_run_with_the_environment(eval_data: EvalData, tmp_path: Path, s3_env: Any,
                                              s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    from data_shards.storage import open_location

    local = make_cli_run(tmp_path, eval_data)
    run_url = f"s3://{s3_bucket}/runs/cli"
    remote = open_location(run_url)  # endpoint and credentials from the AWS_* environment
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        remote.write_bytes_atomic(path.relative_to(local).as_posix(), path.read_bytes())
    assert main(["--watch", run_url]) == 0
    assert "evaluated 2 checkpoint(s), 0 failed" in capsys.readouterr().out
    for name in ("checkpoint_000001", "checkpoint_000002"):
        metrics = json.loads(remote.read_text(f"{name}/metrics.json"))
        assert metrics["checkpoint"] == f"{run_url}/{name}" and list(metrics["test"]) == ["all"]
    best = json.loads(remote.read_text("best.json"))
    rsums = [json.loads(remote.read_text(f"{n}/metrics.json"))["dev_rsum"] for n in ("checkpoint_000001", "checkpoint_000002")]
    assert best["dev_rsum"] == max(rsums)


# ----------------------------------------------------------------------------------------------
# The annotated protocols eccv and cxc (tests/trainer/test_evaluation_eccv_cxc.py checks their
# numbers against the eccv-caption package)


def test_embeddings_eccv_and_cxc_with_ids(files: dict[str, Path], tmp_path: Path) -> None:
    """The pinned keys on stdout and in the file; ids in the archive place rows in any order."""
    from data_shards.coco_annotations import coco_5k_test_ids
    from trainer.evaluation import CXC_KEYS, ECCV_KEYS, evaluate_embeddings_protocols

    images, captions = load_npz(files["a"])
    image_ids, caption_ids = coco_5k_test_ids()
    order = np.random.default_rng(1).permutation(images.shape[0])
    rows = (5 * order[:, None] + np.arange(5)).reshape(-1)
    shuffled = tmp_path / "shuffled.npz"
    np.savez(shuffled, images=images[order], captions=captions[rows], image_ids=image_ids[order],
             caption_ids=caption_ids[rows])
    output = tmp_path / "metrics.json"
    result = run_cli("--embeddings", shuffled, "--protocol", "eccv", "--protocol", "cxc", "--output", output)
    assert result.returncode == 0, result.stderr
    metrics = json.loads(output.read_text())
    assert list(metrics) == ["eccv", "cxc"]
    assert list(metrics["eccv"]) == list(ECCV_KEYS) and list(metrics["cxc"]) == list(CXC_KEYS)
    expected = evaluate_embeddings_protocols([(images, captions)], ["eccv", "cxc"])  # the standard order
    for protocol in expected:
        assert metrics[protocol] == pytest.approx(expected[protocol], abs=1e-9)
    assert "mAP@R" in result.stdout and f"{metrics['eccv']['t2i_map_at_r']:.2f}" in result.stdout
    assert f"{metrics['cxc']['i2t_r10']:.2f}" in result.stdout


def test_eccv_and_cxc_bad_inputs(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--embeddings", str(files["small"]), "--protocol", "all", "--protocol", "cxc"]) == 2
    error = capsys.readouterr().err
    assert f"{files['small']}: protocol 'cxc'" in error and "image_ids" in error and "N=300" in error
    images, captions = load_npz(files["small"])
    only_captions = tmp_path / "only_captions.npz"
    np.savez(only_captions, images=images, captions=captions, caption_ids=np.arange(1500))
    assert main(["--embeddings", str(only_captions), "--protocol", "eccv"]) == 2
    assert "has 'caption_ids' but no 'image_ids'" in capsys.readouterr().err
    wrong = tmp_path / "wrong_ids.npz"
    np.savez(wrong, images=images, captions=captions, image_ids=np.arange(299))
    assert main(["--embeddings", str(wrong), "--protocol", "eccv"]) == 2
    assert f"{wrong}: 'image_ids' has shape (299,), but 'images' has 300 rows" in capsys.readouterr().err
