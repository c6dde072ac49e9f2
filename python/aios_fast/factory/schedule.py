"""Cron scheduling with a misfire grace, for ``SkillFactory.schedule``.

A fire time is due when it has passed and was not run yet. If the process was down (or busy)
at a fire time and comes back within ``misfire_grace`` seconds of it, the run happens at once;
later than that it is recorded as missed and skipped (a nightly job that starts at noon would
compete with the day's traffic). Only the most recent missed fire time is run: a node that was
off for three nights runs once, not three times. The last fire time handled is kept in a small
JSON file, written atomically, so a restarted scheduler neither repeats nor forgets a run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .._atomic import atomic_write_bytes
from ..errors import InputError

__all__ = ["CronSchedule", "run_schedule"]


@dataclass
class CronSchedule:
    """A cron expression (5 fields, UTC) and a misfire grace in seconds (>= 3600 by default)."""

    cron: str = "0 2 * * *"
    misfire_grace: float = 3600.0

    def __post_init__(self) -> None:
        from croniter import croniter

        if not isinstance(self.cron, str) or not croniter.is_valid(self.cron):
            raise InputError(f"cron: {self.cron!r} is not a valid cron expression (e.g. '0 2 * * *')")
        if not (isinstance(self.misfire_grace, (int, float)) and self.misfire_grace >= 0):
            raise InputError(f"misfire_grace: expected seconds >= 0, got {self.misfire_grace!r}")

    def next_after(self, t: float) -> float:
        """The first fire time strictly after POSIX time ``t``."""
        from croniter import croniter

        return float(croniter(self.cron, datetime.fromtimestamp(t, timezone.utc)).get_next(float))

    def latest_at_or_before(self, t: float) -> float:
        from croniter import croniter

        it = croniter(self.cron, datetime.fromtimestamp(t + 1e-6, timezone.utc))
        return float(it.get_prev(float))

    def decide(self, last_handled: float | None, now: float) -> tuple[str, float | None]:
        """``("run", fire)`` when a fire time after ``last_handled`` is due within the grace,
        ``("missed", fire)`` when the latest one is older than the grace, ``("wait", next)``
        otherwise."""
        latest = self.latest_at_or_before(now)
        if last_handled is None or latest > last_handled:
            if now - latest <= self.misfire_grace:
                return "run", latest
            if last_handled is not None:
                return "missed", latest
        return "wait", self.next_after(now)


def run_schedule(job: Callable[[], Any], schedule: CronSchedule, state_file: str | Path, *,
                 now: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 should_stop: Callable[[], bool] = lambda: False, max_runs: int | None = None,
                 on_event: Callable[[str, float, Any], None] | None = None) -> int:
    """Run ``job`` at ``schedule``'s fire times until ``should_stop()`` or ``max_runs`` runs.

    ``state_file`` keeps the last fire time handled. A first start with no state does not run
    a fire time from before it started unless that is within the grace. Returns the number of
    runs. ``on_event(kind, fire_time, result_or_error)`` reports "run", "failed", "missed".
    """
    path = Path(state_file)
    last: float | None = None
    if path.exists():
        try:
            last = float(json.loads(path.read_text())["last_fire"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{path}: unreadable schedule state ({exc}); delete it to start afresh") from None
    runs = 0
    while not should_stop() and (max_runs is None or runs < max_runs):
        action, t = schedule.decide(last, now())
        if action == "wait":
            # wake at the next fire time, but at least every minute so should_stop is honoured
            sleep(max(0.0, min(t - now(), 60.0)))
            continue
        last = t
        atomic_write_bytes(path, json.dumps({"last_fire": t, "cron": schedule.cron}).encode())
        if action == "missed":
            if on_event:
                on_event("missed", t, None)
            continue
        try:
            result = job()
        except Exception as exc:  # noqa: BLE001 - a failed night must not stop the scheduler
            if on_event:
                on_event("failed", t, exc)
        else:
            if on_event:
                on_event("run", t, result)
        runs += 1
    return runs
