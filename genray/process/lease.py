"""A lease on an output prefix: one bulk job at a time writes there.

`<output>/_genray_lease.json` is created with a conditional PUT (If-None-Match: *; locally a hard link, which fails
if the file exists), renewed by a background thread, and deleted at the end. A second run finds it and refuses,
naming the holder; a lease whose run died expires after `lease_seconds` (at once when the holder was a process on
this host that no longer exists) and is then taken over with a compare-and-swap (If-Match on its ETag; locally a
rename that only one taker wins).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time

from genray import storage

LEASE_NAME = "_genray_lease.json"


class LeaseError(RuntimeError):
    """Another run holds the output prefix."""


def lost_lease(output_uri: str, run_id: str) -> str | None:
    """None while run `run_id` holds the lease on `output_uri`, else why it does not: what a run that lost its
    lease (paused past its expiry and taken over, or the lease deleted by hand) stops on, before writing more."""
    uri = storage.join_uri(output_uri, LEASE_NAME)
    try:
        held = json.loads(storage.read_bytes(uri))
    except storage.StorageError as err:
        if err.reason != "missing_object":
            raise  # a storage failure: the write that follows would fail alike
        held = {}
    except ValueError:
        held = {}
    if held.get("run_id") == run_id:
        return None
    now = f"run {held.get('run_id')} on {held.get('host')} holds it now" if held else "the lease object is gone"
    return (f"{uri}: this run ({run_id}) lost its lease on the output prefix ({now}); stopped before writing "
            f"more, so that two runs never write it at once. What this run committed is in the manifest; rerun "
            f"the same command once the other run is done")


def _holder_is_dead_here(held: dict) -> bool:
    """A lease taken on this host by a process that no longer exists: a killed driver's, so a rerun of the same
    command (the documented way to resume) need not wait for it to expire. Elsewhere only expiry can tell."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)  # signal 0: is there such a process?
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Lease:
    def __init__(self, output_uri: str, run_id: str, seconds: float, log=print):
        self.output_uri, self.uri = output_uri, storage.join_uri(output_uri, LEASE_NAME)
        self.run_id, self.seconds, self.log = run_id, seconds, log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _body(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires": time.time() + self.seconds}).encode()

    def acquire(self) -> "Lease":
        try:
            storage.write_bytes(self.uri, self._body(), if_absent=True)
        except storage.StorageError as err:
            if err.reason != "exists":
                raise
            self._take_over_expired()
        self._thread = threading.Thread(target=self._renew_loop, name="genray-lease", daemon=True)
        self._thread.start()
        return self

    def _take_over_expired(self) -> None:
        try:
            info = storage.stat(self.uri)
            held = json.loads(storage.read_bytes(self.uri))
        except (storage.StorageError, ValueError):
            held, info = {}, None  # released between our PUT and now, or unreadable: treat as expired
        if held.get("expires", 0) > time.time() and not _holder_is_dead_here(held):
            raise LeaseError(
                f"{self.uri}: another run ({held.get('run_id')} on {held.get('host')}, pid {held.get('pid')}) is "
                f"writing this output prefix until {time.strftime('%H:%M:%S', time.localtime(held['expires']))}; "
                f"two runs at once would overwrite each other's outputs and shards. Wait for it, or delete the "
                f"lease object if that run is dead (it expires by itself {self.seconds:g} s after its last renewal, "
                f"--lease-seconds)")
        self.log(f"[genray] taking over the lease of run {held.get('run_id')} on {self.uri} (expired, or its process "
                 "on this host is gone)")
        if not self._swap(info):
            raise LeaseError(f"{self.uri}: another run took over the expired lease first")

    def _swap(self, info: storage.ObjectInfo | None) -> bool:
        """Replace the lease only if it is still the one we read (info), atomically."""
        if storage.is_s3(self.uri):
            bucket, key = storage._split_s3(self.uri)
            kwargs = {"IfMatch": f'"{info.etag}"'} if info else {"IfNoneMatch": "*"}
            try:
                with storage._s3_errors(self.uri):
                    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=self._body(), **kwargs)
                return True
            except storage.StorageError as err:
                if "PreconditionFailed" in str(err) or "412" in str(err):
                    return False
                raise
        path = storage._local_path(self.uri)
        stale = f"{path}.stale-{self.run_id}"
        try:
            os.rename(path, stale)  # only one taker's rename finds the file
        except FileNotFoundError:
            pass
        else:
            os.remove(stale)
        try:
            storage.write_bytes(self.uri, self._body(), if_absent=True)
            return True
        except storage.StorageError as err:
            if err.reason == "exists":
                return False
            raise

    def check(self) -> None:
        """Raise LeaseError unless this run still holds the lease. Called before each tar shard is committed and
        before the manifest is compacted: a run that lost it (paused past its expiry and taken over, or its lease
        deleted by hand) must not write shards or rewrite manifest segments beside the run that holds it now."""
        lost = lost_lease(self.output_uri, self.run_id)
        if lost:
            self.lost = True
            raise LeaseError(lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                held = json.loads(storage.read_bytes(self.uri))
                if held.get("run_id") != self.run_id:
                    self.lost = True
                    self.log(f"[genray] WARNING: lost the lease on {self.uri} to run {held.get('run_id')}")
                    return
                storage.write_bytes(self.uri, self._body())
            except (storage.StorageError, ValueError) as err:  # a blip: the next renewal tries again
                self.log(f"[genray] could not renew the lease {self.uri}: {err}")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            held = json.loads(storage.read_bytes(self.uri))
            if held.get("run_id") == self.run_id:
                storage.delete(self.uri)
        except (storage.StorageError, ValueError):
            pass
