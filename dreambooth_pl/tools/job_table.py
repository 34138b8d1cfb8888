"""The live console table of ``ablate`` and ``fit-many``: each job's state, attempts and time, and an ETA.

On a terminal the table is redrawn in place; in a log (not a TTY) it is printed again only when a state changes.
"""
from __future__ import annotations

import sys
import time
from typing import Optional


def job_state(status: Optional[dict], session: str) -> str:
    """``queued``, ``running``, ``retried`` (running again after its fit died), ``done`` or ``failed``."""
    status = status or {}
    state = status.get("status")
    if state in ("done", "failed"):
        return state
    if state in ("running", "retrying") and status.get("session") == session:
        return "retried" if status.get("attempt", 1) > 1 or state == "retrying" else "running"
    return "queued"


def eta_seconds(states: dict[str, str], seconds: list[float], slots: int) -> Optional[float]:
    """Remaining time: unfinished jobs x the mean time of the jobs done in this session / jobs at once."""
    left = sum(s not in ("done", "failed") for s in states.values())
    if not seconds or not left:
        return None if left else 0.0
    return left * (sum(seconds) / len(seconds)) / max(1, slots)


class JobTable:
    """Prints the table for a list of jobs.

    Args:
        title: first line.
        names: jobs, in table order.
        workers: jobs at once (for the ETA; None: 1).
    """

    def __init__(self, title: str, names: list[str], workers: Optional[int] = None):
        self.title, self.names, self.slots = title, names, workers or 1
        self.start = time.time()
        self._last: Optional[tuple] = None
        self._lines = 0
        self.tty = sys.stdout.isatty()

    def render(self, statuses: dict[str, Optional[dict]], session: str) -> list[str]:
        states = {n: job_state(statuses.get(n), session) for n in self.names}
        seconds = [float(s["seconds"]) for n, s in statuses.items()
                   if s and s.get("session") == session and states[n] == "done" and "seconds" in s]
        counts = {k: sum(v == k for v in states.values()) for k in ("done", "running", "retried", "failed", "queued")}
        eta = eta_seconds(states, seconds, self.slots)
        head = (f"{self.title}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)
                + f"; {time.time() - self.start:.0f} s" + (f", ETA {eta:.0f} s" if eta else ""))
        width = max(len(n) for n in self.names)
        rows = []
        for n in self.names:
            s = statuses.get(n) or {}
            extra = s.get("error") or "" if states[n] == "failed" else ""
            took = f"{s['seconds']:.0f} s" if states[n] == "done" and "seconds" in s else ""
            tries = f"attempt {s.get('attempt')}" if states[n] in ("running", "retried") else ""
            rows.append(f"  {n:<{width}}  {states[n]:<8} {took or tries} {extra}".rstrip())
        return [head, *rows]

    def update(self, statuses: dict[str, Optional[dict]], session: str) -> None:
        lines = self.render(statuses, session)
        key = tuple(lines[1:])
        if self.tty:
            sys.stdout.write(("\x1b[F\x1b[K" * self._lines) + "\n".join(lines) + "\n")
            self._lines = len(lines)
        elif key != self._last:
            print("\n".join(lines), flush=True)
        self._last = key
        sys.stdout.flush()

    def close(self, statuses: dict[str, Optional[dict]], session: str) -> None:
        self._last = None
        self.update(statuses, session)
