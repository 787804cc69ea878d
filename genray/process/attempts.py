"""Bounded retries for inputs that kill their worker (a crash, an OOM kill), in the model stage and the read stage:
see AttemptTracker.

Standard library only: the tracker runs as a Ray actor of its own, and a light module keeps that process at Ray's
baseline (~80 MB) instead of importing torch and the bulk job.
"""
from __future__ import annotations


class AttemptTracker:
    """A small Ray actor that remembers which inputs a worker began and did not finish. A batch that comes back
    after its worker died (Ray restarts the actor, or reruns the read task, and retries without limit by default)
    is then handled one input at a time, and an input begun `max_attempts` times becomes an error row instead of
    killing the next worker: one bad file cannot loop forever. The read stage keys its units 'read:<key>' and also
    records how many rows an archive's read task handed on (`gave`). Memory: the keys in flight only."""

    def __init__(self):
        self.begun: dict[str, int] = {}
        self.given: dict[str, int] = {}  # read units in flight: rows the furthest attempt handed on
        self.actor_starts = self.actor_ready = 0

    def begin_batch(self, keys: list[str]) -> bool:
        """False (and every key counted) for a fresh batch; True for a batch a dead worker had begun."""
        if any(k in self.begun for k in keys):
            return True
        for k in keys:
            self.begun[k] = 1
        return False

    def begin(self, key: str) -> int:
        """Attempts begun before this one (each ended by a dead worker)."""
        prior = self.begun.get(key, 0)
        self.begun[key] = prior + 1
        return prior

    def begin_read(self, key: str) -> tuple[int, int]:
        """For an archive's read task: (attempts begun before this one, rows the furthest of them handed on)."""
        return self.begin(key), self.given.get(key, 0)

    def gave(self, key: str, rows: int) -> None:
        self.given[key] = max(rows, self.given.get(key, 0))

    def finish(self, keys: list[str]) -> None:
        for k in keys:
            self.begun.pop(k, None)
            self.given.pop(k, None)

    def actor_starting(self) -> int:
        """Model actors begun and not (yet) ready, this one included."""
        self.actor_starts += 1
        return self.actor_starts - self.actor_ready

    def actor_started(self) -> None:
        self.actor_ready += 1
