"""The stepped load schedule ("users:seconds,..."), read the same way by both sides of a run.

Locust's shape (`locustfile.py`) sets the users from it, and `stepped_load.py` labels its
replica samples and finds its load changes from it; one reading keeps the two in step.
"""

from __future__ import annotations


def parse_steps(text: str) -> list[tuple[int, float]]:
    steps = []
    for part in text.split(","):
        users, seconds = part.split(":")
        steps.append((int(users), float(seconds)))
    return steps


def users_at(steps: list[tuple[int, float]], t: float) -> int | None:
    """The users of the step running `t` seconds after the load started; None once all have run."""
    for users, seconds in steps:
        if t < seconds:
            return users
        t -= seconds
    return None
