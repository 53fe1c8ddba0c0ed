"""Staged load shapes for Locust: ramp, hold, spike. Plain data, so tools can read them without importing Locust.

Each stage is (fraction of the peak user count, spawn rate as a fraction of the peak per second),
and lasts one stage length.
    ramp   users rise in steps of a quarter of the peak, one stage each
    hold   up to the peak quickly, then hold for three stages
    spike  a quarter of the peak, a spike to the peak, back to a quarter
"""

from __future__ import annotations

MAX_SPAWN_RATE = 100.0
PROFILES: dict[str, list[tuple[float, float]]] = {
    "ramp": [(0.25, 1.0), (0.5, 1.0), (0.75, 1.0), (1.0, 1.0)],
    "hold": [(1.0, 4.0), (1.0, 4.0), (1.0, 4.0)],
    "spike": [(0.25, 1.0), (1.0, 8.0), (0.25, 8.0)],
}


def stage_at(profile: str, peak_users: int, stage_seconds: float, run_time_s: float) -> tuple[int, float] | None:
    """(users, spawn rate) at `run_time_s` into the run, or None once the last stage is over."""
    stages = PROFILES[profile]
    index = int(run_time_s // stage_seconds)
    if index >= len(stages):
        return None
    fraction, rate = stages[index]
    # Locust warns that spawning more than 100 users a second can misbehave.
    return max(1, round(fraction * peak_users)), min(MAX_SPAWN_RATE, max(1.0, rate * peak_users))


def total_seconds(profile: str, stage_seconds: float) -> float:
    return len(PROFILES[profile]) * stage_seconds
