"""Verify a sharded split: re-read every shard and check it against the manifest.

    python data_shards/verify.py OUT [--workers N] [--endpoint-url URL]

OUT is a local directory or `s3://bucket/prefix` holding `manifest.json` and its shards. Checked:
the manifest itself; that every listed shard exists, hashes to its sha256, holds the listed number
of samples and is a readable tar; every sample: its members (regions.npy, captions.json, meta.json
required; boxes.npy, size.json optional; nothing else), feature shape and dtype as in the manifest,
no NaN or Inf, captions present and non-empty, meta split equal to the manifest's, keys and source
indices unique across shards; the total caption count. A `.tar` in OUT that the manifest does not
list is a warning (readers ignore it).

Exit status 0 with a one-line summary on stdout when everything is fine; 1 with one line per problem
on stderr, each naming the shard (and the sample key where it concerns one sample).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import sys
import tarfile
from dataclasses import dataclass, field
from typing import Any

from data_shards.format import (
    MANIFEST_NAME,
    OPTIONAL_MEMBERS,
    REQUIRED_MEMBERS,
    Manifest,
    ShardFormatError,
    ShardInfo,
    decode_sample,
    split_member_name,
)
from data_shards.shard_reader import ShardStream, sample_problems, tar_members
from data_shards.storage import Location, StorageError, is_s3_url, open_location, s3_storage_options

logger = logging.getLogger("data_shards.verify")

KNOWN_MEMBERS = frozenset(REQUIRED_MEMBERS + OPTIONAL_MEMBERS)
MAX_SAMPLE_MESSAGES = 10  # per shard: a systematic fault should not print a line per image


@dataclass
class ShardReport:
    """What one shard holds and what is wrong with it."""

    name: str
    samples: int = 0
    captions: int = 0
    sha256: str = ""
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)


@dataclass
class VerifyReport:
    """The outcome of `verify`: errors make it fail, warnings do not."""

    location: str
    manifest: Manifest | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def check_shard(location: Location, info: ShardInfo, manifest: Manifest) -> ShardReport:
    """Read one shard from start to end: hash, samples, members, feature shape/dtype/finiteness."""
    url = location.child_url(info.name)
    report = ShardReport(name=info.name)
    problems: list[str] = []
    try:
        stream = location.open_read(info.name)
    except FileNotFoundError:
        report.problems.append(f"{url}: missing (listed in {MANIFEST_NAME})")
        return report
    with stream:
        reader = ShardStream(stream, url)
        sample: dict[str, Any] | None = None

        def finish(current: dict[str, Any] | None) -> None:
            if current is not None:
                report.samples += 1
                problems.extend(_sample_problems(current, manifest, report))

        try:
            for member in tar_members(reader):
                parts = split_member_name(member.name)
                if not member.is_file or parts is None:
                    problems.append(f"{url}: member {member.name!r} is not a <key>.<member> file")
                    continue
                key, suffix = parts
                if sample is None or sample["__key__"] != key:
                    finish(sample)
                    sample = {"__key__": key, "__url__": url}
                if suffix in sample:
                    problems.append(f"{url}: sample {key}: duplicate member {suffix}")
                sample[suffix] = member.data
            finish(sample)
        except (tarfile.TarError, EOFError) as exc:
            report.problems.append(f"{url}: unreadable tar after {report.samples} samples ({exc})")
        reader.drain()  # the hash covers the whole file, including what tarfile did not need
    report.sha256 = reader.hexdigest() or ""
    if report.sha256 != info.sha256:
        report.problems.append(f"{url}: sha256 {report.sha256} does not match {MANIFEST_NAME} ({info.sha256})")
    if report.samples != info.samples:
        report.problems.append(f"{url}: {report.samples} samples, {MANIFEST_NAME} lists {info.samples}")
    report.problems.extend(problems[:MAX_SAMPLE_MESSAGES])
    if len(problems) > MAX_SAMPLE_MESSAGES:
        report.problems.append(f"{url}: ... and {len(problems) - MAX_SAMPLE_MESSAGES} more sample problems")
    return report


def _sample_problems(sample: dict[str, Any], manifest: Manifest, report: ShardReport) -> list[str]:
    where = f"{sample['__url__']}: sample {sample['__key__']}"
    problems = [f"{where}: unknown member {name}" for name in sample
                if not name.startswith("__") and name not in KNOWN_MEMBERS]
    try:
        record = decode_sample(sample)
    except ShardFormatError as exc:
        return [*problems, str(exc)]
    report.captions += len(record.captions)
    report.keys.append(record.key)
    report.indices.append(record.index)
    problems += [f"{where}: {problem}"
                 for problem in sample_problems(record, manifest.feature_shape, manifest.feature_dtype, manifest.split)]
    return problems


def verify(output: str, storage_options: dict[str, Any] | None = None, workers: int = 1) -> VerifyReport:
    """Check the manifest and every shard of `output`; never raises for bad data, only reports."""
    location = open_location(output, storage_options)
    report = VerifyReport(location=location.url)
    manifest_url = location.child_url(MANIFEST_NAME)
    try:
        text = location.read_text(MANIFEST_NAME)
    except FileNotFoundError:
        report.errors.append(f"{manifest_url}: missing (is {output} a converted split?)")
        return report
    except StorageError as exc:
        report.errors.append(str(exc))
        return report
    try:
        manifest = Manifest.from_json(text, manifest_url)
    except ShardFormatError as exc:
        report.errors.append(str(exc))
        return report
    report.manifest = manifest
    names = [info.name for info in manifest.shards]
    for name in sorted({n for n in names if names.count(n) > 1}):
        report.errors.append(f"{manifest_url}: shard {name} is listed more than once")
    listed = set(names)
    for name in location.list(".tar"):
        if name not in listed:
            report.warnings.append(f"{location.child_url(name)}: not listed in {MANIFEST_NAME} (readers ignore it)")
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        shard_reports = list(pool.map(lambda info: check_shard(location, info, manifest), manifest.shards))
    seen_keys: dict[str, str] = {}
    seen_indices: dict[int, str] = {}
    for shard_report in shard_reports:
        report.errors.extend(shard_report.problems)
        url = location.child_url(shard_report.name)
        for key in shard_report.keys:
            if key in seen_keys:
                report.errors.append(f"{url}: sample {key}: key also in {seen_keys[key]}")
            seen_keys.setdefault(key, shard_report.name)
        for index in shard_report.indices:
            if index in seen_indices:
                report.errors.append(f"{url}: source index {index} also in {seen_indices[index]}")
            seen_indices.setdefault(index, shard_report.name)
    captions = sum(r.captions for r in shard_reports)
    if not any(r.problems for r in shard_reports) and captions != manifest.captions:
        report.errors.append(f"{manifest_url}: shards hold {captions} captions, manifest says {manifest.captions}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Verify OUT; 0 with a summary line when it is sound, 1 with one line per problem otherwise."""
    parser = argparse.ArgumentParser(prog="python data_shards/verify.py",
                                     description="Re-read every shard of a converted split and check it.")
    parser.add_argument("output", metavar="OUT", help="local directory or s3://bucket/prefix with manifest.json")
    parser.add_argument("--workers", type=int, default=1, help="shards checked concurrently (threads; default 1)")
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        options = s3_storage_options(endpoint_url=args.endpoint_url) if is_s3_url(args.output) else {}
        report = verify(args.output, options, workers=args.workers)
    except (StorageError, OSError) as exc:
        print(f"verify: error: {exc}", file=sys.stderr)
        return 1
    for warning in report.warnings:
        print(f"verify: warning: {warning}", file=sys.stderr)
    if not report.ok:
        for error in report.errors:
            print(f"verify: error: {error}", file=sys.stderr)
        print(f"verify: {report.location}: FAILED, {len(report.errors)} problems", file=sys.stderr)
        return 1
    manifest = report.manifest
    assert manifest is not None
    print(f"OK {report.location}: {len(manifest.shards)} shards, {manifest.images} images, {manifest.captions} "
          f"captions, features {tuple(manifest.feature_shape)} {manifest.feature_dtype}, checksums match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
