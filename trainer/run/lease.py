"""One writer per run: the lease on RUN_DIR (docs/run_layout.md, "The lease").

Two trainers on the same RUN_DIR (a RayJob re-applied while the old one still runs, a retry whose
predecessor is not dead yet, two people resuming one run name) would interleave their steps in
train_log.jsonl and overwrite each other's checkpoints and best.json. So trainer/launch.py takes
this lease before it writes anything in RUN_DIR, renews it from a thread of the driver while the
run lasts, and releases it at the end, whether the run succeeded or failed.

The record, RUN_DIR/lease.json (trainer/run/layout.py's `LEASE_FILE`), is a small JSON object: a
random token of this holding, the owner (host, pid, Ray job and cluster address), the start time,
and the heartbeat time (ISO and Unix seconds). Every write of it is conditional on the version last read
(data_shards/storage.py, `Location.write_bytes_if`):

* locally, read-check-replace happens under an `flock` of the hidden `.lock-lease.json`, so two
  trainers racing for the lease are serialized and exactly one gets it;
* on S3, creation is a PutObject with `If-None-Match: *` and every later write (renewal, takeover)
  a PutObject with `If-Match: <ETag read>`, the release a DeleteObject with `If-Match`. AWS S3 and
  moto (the tests' server, >= 5.2.5) honour both. A store that ignores the headers silently turns
  the race of two trainers starting within the same second into last-writer-wins: the loser sees
  a foreign token when it reads the record back right after writing it, or at its first renewal
  (a few seconds later), and stops. A store that answers 501 gets plain writes (storage.py warns).

Who may take the lease:

* nobody holds it (no lease.json): the new trainer creates it;
* it is stale: its heartbeat is older than the timeout, the larger of this trainer's
  `checkpoint.lease_timeout_s` and the one the holder recorded (a holder renewing every 10 s must
  not be taken over by a newcomer with a 5 s timeout). The new trainer takes it over, logs that
  it did, and the run resumes from its last checkpoint as usual. Ages are wall-clock differences
  between hosts: they assume clocks within seconds of each other (NTP), far below the timeout;
* `checkpoint.force_lease=true`: the new trainer takes over a fresh lease too, after a warning;
* `checkpoint.lease_wait_s` > 0 and the holder stopped heart-beating (its heartbeat unchanged for
  two of its intervals): the new trainer waits for the lease to go stale, if it does within the
  wait, and takes it over then; a holder whose heartbeat moves meanwhile is refused at once. A
  Kubernetes retry of a job whose driver was killed uses this (docs/operations.md).

Otherwise `acquire` raises `LeaseHeldError`, whose message is the one line launch.py prints
before exiting 2: the run, the holder, the age of its heartbeat, and what to do.

Losing the lease: every renewal first reads the record and checks that the token is still ours.
When another trainer took it over (force, or stale because this driver stalled past the
timeout), the heartbeat stops, `lost` is set, and the `on_lost` callback runs once in the
heartbeat thread: launch.py uses it to abort its training run (the run then fails with
`LeaseLostError`), so the two trainers overlap by at most one heartbeat interval plus Ray's abort.
A record that vanished (someone deleted it) is created again, if nobody else did first.

Readers (evaluate.py --watch, the evaluation actor, report.py) need no lease: they write only
their own records; `read_lease` and `describe_holder` let them say who trains the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from data_shards.storage import Location, open_location
from trainer.run.layout import LEASE_FILE, utc_now

__all__ = [
    "LEASE_FORMAT_VERSION",
    "LeaseError",
    "LeaseHeldError",
    "LeaseLostError",
    "LeaseRecord",
    "LeaseRecordError",
    "RunLease",
    "describe_holder",
    "format_age",
    "heartbeat_interval",
    "read_lease",
]

logger = logging.getLogger(__name__)

LEASE_FORMAT_VERSION = 1
MAX_HEARTBEAT_INTERVAL_S = 10.0
# Attempts of `acquire` when the record changes between its read and its conditional write.
ACQUIRE_ATTEMPTS = 5


class LeaseError(RuntimeError):
    """A problem with the lease on a run directory; the message is one line naming the run."""


class LeaseHeldError(LeaseError):
    """Another trainer holds the run's lease (or its record is unreadable)."""

    def __init__(self, message: str, holder: LeaseRecord | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseLostError(LeaseError):
    """Another trainer took this trainer's lease over while it was running."""

    def __init__(self, message: str, holder: LeaseRecord | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class LeaseRecordError(ValueError):
    """lease.json is not a lease record this code reads; the message names the file."""


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between renewals: four per timeout, at most every 10 s."""
    return min(MAX_HEARTBEAT_INTERVAL_S, timeout_s / 4.0)


def format_age(seconds: float) -> str:
    """`12 s`, `7 min`, `3.2 h`: how long ago a heartbeat was, for one-line messages."""
    if seconds < 120:
        return f"{max(seconds, 0.0):.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """The content of RUN_DIR/lease.json."""

    token: str  # random per holding: tells this trainer's record from any other's
    host: str
    pid: int
    ray: str  # "ray job J on ADDRESS" once the driver is connected; "" before (or the RAY_ADDRESS)
    started_at: str  # ISO 8601 UTC: when this trainer took the lease
    heartbeat_at: str  # ISO 8601 UTC of the last renewal (for people)
    heartbeat_unix: float  # the same as Unix seconds (for computing ages)
    timeout_s: float  # the holder's checkpoint.lease_timeout_s
    format_version: int = LEASE_FORMAT_VERSION

    def to_bytes(self) -> bytes:
        return (json.dumps(dataclasses.asdict(self), indent=2) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> LeaseRecord:
        try:
            payload = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LeaseRecordError(f"{where}: not a lease record ({error})") from None
        if not isinstance(payload, dict) or payload.get("format_version") != LEASE_FORMAT_VERSION:
            version = payload.get("format_version") if isinstance(payload, dict) else None
            raise LeaseRecordError(f"{where}: unsupported lease record (format_version {version!r}, this code "
                                   f"reads {LEASE_FORMAT_VERSION})")
        try:
            return cls(token=str(payload["token"]), host=str(payload["host"]), pid=int(payload["pid"]),
                       ray=str(payload.get("ray") or ""), started_at=str(payload["started_at"]),
                       heartbeat_at=str(payload["heartbeat_at"]), heartbeat_unix=float(payload["heartbeat_unix"]),
                       timeout_s=float(payload["timeout_s"]))
        except (KeyError, TypeError, ValueError) as error:
            raise LeaseRecordError(f"{where}: not a lease record (bad or missing field {error})") from None

    def age_s(self, now: float | None = None) -> float:
        """Seconds since the last heartbeat."""
        return (time.time() if now is None else now) - self.heartbeat_unix

    def holder(self) -> str:
        """`host H pid P (ray job J on ADDRESS)`: who holds the lease, for messages."""
        return f"host {self.host} pid {self.pid}" + (f" ({self.ray})" if self.ray else "")

    def renewed(self) -> LeaseRecord:
        now = time.time()
        return dataclasses.replace(self, heartbeat_unix=now, heartbeat_at=utc_now())


def _read(location: Location) -> tuple[bytes | None, str | None]:
    try:
        return location.read_bytes_versioned(LEASE_FILE)
    except FileNotFoundError:
        return None, None


def read_lease(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> LeaseRecord | None:
    """The lease record of a run directory; None when no trainer holds it. LeaseRecordError
    (a ValueError) names the file when it is unreadable."""
    location = open_location(run_dir, storage_options)
    data, _ = _read(location)
    return None if data is None else LeaseRecord.from_bytes(data, location.child_url(LEASE_FILE))


def describe_holder(run_dir: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """One line on who trains the run, for readers' logs (evaluate.py --watch); never raises for
    an unreadable record or store (readers must not depend on the lease)."""
    try:
        record = read_lease(run_dir, storage_options)
    except (ValueError, OSError) as error:
        return f"run {run_dir}: lease unreadable ({error})"
    if record is None:
        return f"run {run_dir}: no trainer holds the lease"
    age = record.age_s()
    stale = " (stale: the trainer is gone)" if age > record.timeout_s else ""
    return f"run {run_dir} is held by {record.holder()}, heartbeat {format_age(age)} ago{stale}"


class _StaleWait:
    """acquire's wait for the lease of a holder that stopped heart-beating (checkpoint.lease_wait_s).

    A holder renews every heartbeat_interval(its timeout); a heartbeat older than two of those
    intervals, unchanged while watched, means the holder stopped (a killed driver, a lost head
    pod), and its lease goes stale at `age > max(timeouts)`. A heartbeat that moves while watched
    means a live trainer: refused at once, whatever the wait."""

    def __init__(self, run: str, timeout_s: float, wait_s: float) -> None:
        self.run, self.timeout_s, self.wait_s = run, timeout_s, wait_s
        self.started = time.monotonic()
        self.seen: LeaseRecord | None = None  # the holder's record when first refused
        self.announced = False

    def check(self, held: LeaseHeldError) -> None:
        """Sleep a little and return to look again, or raise `held` (or a sharper refusal)."""
        current = held.holder
        if self.wait_s <= 0 or current is None:
            raise held
        if self.seen is not None and (current.token != self.seen.token
                                      or current.heartbeat_unix != self.seen.heartbeat_unix):
            raise LeaseHeldError(f"{held} (its heartbeat moved while this trainer waited: it is running)",
                                 current) from None
        self.seen = self.seen or current
        waited = time.monotonic() - self.started
        left = self.wait_s - waited
        stale_after = max(self.timeout_s, current.timeout_s)
        age = current.age_s()
        stale_in = stale_after - age
        if stale_in > left:
            raise LeaseHeldError(f"{held}; its lease goes stale in {format_age(stale_in)}, after the "
                                 f"{format_age(self.wait_s)} of checkpoint.lease_wait_s", current) from None
        quiet = 2 * heartbeat_interval(current.timeout_s)
        if not self.announced and age > quiet:
            self.announced = True
            logger.warning("run %s: the lease of %s has not been renewed for %s: waiting %s for it to go stale "
                           "(checkpoint.lease_wait_s %g s)", self.run, current.holder(), format_age(age),
                           format_age(max(stale_in, 0.0)), self.wait_s)
        time.sleep(max(0.05, min(1.0, stale_in + 0.05, left)))


class RunLease:
    """This trainer's lease on one run directory (module doc). Create it with `acquire`."""

    def __init__(self, location: Location, record: LeaseRecord) -> None:
        self.location = location
        self.record = record
        self.interval_s = heartbeat_interval(record.timeout_s)
        self.lost: LeaseLostError | None = None
        self._lock = threading.Lock()  # renewals (heartbeat thread) against set_ray / release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._released = False

    @property
    def run_dir(self) -> str:
        return self.location.display

    @property
    def where(self) -> str:
        return self.location.child_url(LEASE_FILE)

    # ------------------------------------------------------------------------------------------
    # Taking the lease
    # ------------------------------------------------------------------------------------------

    @classmethod
    def acquire(cls, run_dir: str, *, timeout_s: float, force: bool = False,
                storage_options: Mapping[str, Any] | None = None, ray: str = "", wait_s: float = 0.0) -> RunLease:
        """Take the lease on `run_dir` (module doc: when a held lease may be taken over), creating
        the local directory if needed. Raises LeaseHeldError with the one line to print.

        `wait_s` > 0 (checkpoint.lease_wait_s): a held lease whose holder stopped heart-beating
        (its heartbeat does not move for two of its intervals) is waited for, until it goes stale,
        if that happens within `wait_s`; a holder that still renews is refused at once."""
        location = open_location(run_dir, storage_options)
        location.makedirs()
        where = location.child_url(LEASE_FILE)
        mine = LeaseRecord(token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(), ray=ray,
                           started_at=utc_now(), heartbeat_at=utc_now(), heartbeat_unix=time.time(),
                           timeout_s=float(timeout_s))
        waiting = _StaleWait(location.display, timeout_s, wait_s)
        attempts = 0
        while attempts < ACQUIRE_ATTEMPTS:
            data, version = _read(location)
            if data is not None:
                try:
                    cls._may_take(location, data, where, timeout_s, force)
                except LeaseHeldError as held:
                    waiting.check(held)  # raises when not worth waiting for
                    continue
            attempts += 1
            record = mine.renewed()
            if location.write_bytes_if(LEASE_FILE, record.to_bytes(), version):
                lease = cls(location, record)
                lease._confirm()
                logger.info("took the lease on %s (heartbeat every %.1f s, stale after %g s)", location.display,
                            lease.interval_s, timeout_s)
                return lease
            logger.info("%s changed while taking the lease; looking again", where)
        raise LeaseHeldError(f"run {location.display}: could not take the lease, {where} kept changing (another "
                             "trainer is starting on this run); try again in a minute")

    @staticmethod
    def _may_take(location: Location, data: bytes, where: str, timeout_s: float, force: bool) -> None:
        """Return when the existing record `data` may be replaced, else raise LeaseHeldError."""
        run = location.display
        try:
            current = LeaseRecord.from_bytes(data, where)
        except LeaseRecordError as error:
            if not force:
                raise LeaseHeldError(f"run {run}: {error}; if no trainer runs on it, delete the file or "
                                     "--set checkpoint.force_lease=true to replace it") from None
            logger.warning("checkpoint.force_lease: replacing the unreadable %s (%s)", where, error)
            return
        age = current.age_s()
        stale_after = max(timeout_s, current.timeout_s)
        if age > stale_after:
            logger.warning("taking over the stale lease on run %s: %s, heartbeat %s ago (stale after %g s); "
                           "resuming from the run's last checkpoint", run, current.holder(), format_age(age),
                           stale_after)
            return
        if force:
            logger.warning("checkpoint.force_lease: taking over the lease on run %s from %s, heartbeat %s ago; "
                           "that trainer stops at its next heartbeat", run, current.holder(), format_age(age))
            return
        raise LeaseHeldError(
            f"run {run} is held by {current.holder()}, heartbeat {format_age(age)} ago; wait for it to finish "
            f"(its lease is stale {format_age(stale_after)} after its last heartbeat), or "
            "--set checkpoint.force_lease=true to take it over", current)

    def _confirm(self) -> None:
        """Read the record back: on a store that ignores conditional writes, a trainer that wrote
        at the same moment may have replaced ours (module doc)."""
        data, _ = _read(self.location)
        current = None if data is None else LeaseRecord.from_bytes(data, self.where)
        if current is None or current.token != self.record.token:
            holder = current.holder() if current is not None else "nobody (the record vanished)"
            raise LeaseHeldError(f"run {self.run_dir} is held by {holder}: another trainer took the lease at the "
                                 "same moment; wait for it to finish, or --set checkpoint.force_lease=true to take it "
                                 "over", current)

    # ------------------------------------------------------------------------------------------
    # Holding it
    # ------------------------------------------------------------------------------------------

    def set_ray(self, ray: str) -> None:
        """Record the Ray job (known once the driver is connected) and renew at once."""
        with self._lock:  # not between a renewal's read of the record and its write
            self.record = dataclasses.replace(self.record, ray=ray)
        self.renew()

    def renew(self) -> None:
        """Write a new heartbeat if the lease is still ours; LeaseLostError (also kept in `lost`)
        when another trainer holds it now."""
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if self._released:
                return
            data, version = _read(self.location)
            if data is None:
                logger.warning("%s vanished while this trainer held it; writing it again", self.where)
            else:
                self._check_ours(data)
            record = self.record.renewed()
            if not self.location.write_bytes_if(LEASE_FILE, record.to_bytes(), version):
                # Changed between our read and our write: ours again only if nobody else wrote.
                data, _ = _read(self.location)
                if data is not None:
                    self._check_ours(data)
                logger.warning("%s changed during a renewal; renewing again at the next heartbeat", self.where)
                return
            self.record = record

    def _check_ours(self, data: bytes) -> None:
        try:
            current: LeaseRecord | None = LeaseRecord.from_bytes(data, self.where)
        except LeaseRecordError:
            current = None  # someone replaced our record with something else: not ours any more
        if current is not None and current.token == self.record.token:
            return
        holder = current.holder() if current is not None else f"an unreadable {self.where}"
        self.lost = LeaseLostError(f"run {self.run_dir}: another trainer took over this trainer's lease "
                                   f"({holder} holds it now); this trainer stops so that the two do not "
                                   "interleave", current)
        raise self.lost

    def start_heartbeat(self, on_lost: Callable[[LeaseLostError], None] | None = None) -> None:
        """Renew every `interval_s` in a daemon thread until `release`. Storage errors are logged
        and retried; on a lost lease the thread logs it, calls `on_lost` once and ends."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._beat, args=(on_lost,), name="run-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, on_lost: Callable[[LeaseLostError], None] | None) -> None:
        last_renewal = time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                self.renew()
                last_renewal = time.monotonic()
            except LeaseLostError as lost:
                logger.error("%s", lost)
                if on_lost is not None:
                    on_lost(lost)
                return
            except Exception as error:  # noqa: BLE001 - a store hiccup: keep the lease, try again
                silent = time.monotonic() - last_renewal
                level = logging.ERROR if silent > self.record.timeout_s else logging.WARNING
                logger.log(level, "renewing the lease on %s failed (%s: %s); not renewed for %.0f s (stale after "
                           "%g s); retrying in %.1f s", self.run_dir, type(error).__name__, error, silent,
                           self.record.timeout_s, self.interval_s)

    def stop_heartbeat(self) -> None:
        """Stop renewing, keeping the record (it goes stale after the timeout, as a killed
        driver's does); `release` calls it first."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def check(self) -> None:
        """Raise LeaseLostError if another trainer took the lease over."""
        if self.lost is not None:
            raise self.lost

    def release(self) -> None:
        """Stop the heartbeat and delete the record if it is still ours (a lost lease is left to
        its new holder). Logs instead of raising: a run's result must not hinge on its release;
        an unreleased lease goes stale after the timeout."""
        self.stop_heartbeat()
        with self._lock:
            if self._released or self.lost is not None:
                return
            self._released = True
            try:
                data, version = _read(self.location)
                if data is None or version is None:
                    return
                try:
                    current = LeaseRecord.from_bytes(data, self.where)
                except LeaseRecordError:
                    return
                if current.token != self.record.token:
                    logger.warning("not releasing %s: %s holds it now", self.where, current.holder())
                    return
                if self.location.remove_if(LEASE_FILE, version):
                    logger.info("released the lease on %s", self.run_dir)
            except Exception as error:  # noqa: BLE001 - see the docstring
                logger.warning("releasing the lease on %s failed (%s: %s); it goes stale %g s after its last "
                               "heartbeat", self.run_dir, type(error).__name__, error, self.record.timeout_s)

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
