"""Per-step schedules, precomputed as arrays before the loop (one lookup per step, easy to plot and test).

DINO decays the learning rate and raises the weight decay along half cosines, raises the teacher's EMA
momentum from 0.996 to 1 the same way, and warms the teacher temperature up linearly. Schedules are
indexed by optimizer step (not epoch): a streamed dataset has no fixed epoch length.
"""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """``total_steps`` values: linear from ``warmup_start`` to ``base_value`` over ``warmup_steps``, then a
    half cosine from ``base_value`` down (or up) to ``final_value`` at the last step."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must lie in [0, total_steps={total_steps}]")
    warmup = np.linspace(warmup_start, base_value, warmup_steps, endpoint=False)
    decay_steps = total_steps - warmup_steps
    # progress runs 0 -> 1 over the decay so that its last step takes exactly final_value
    progress = np.arange(decay_steps) / max(decay_steps - 1, 1)
    decay = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay]).astype(np.float64)


def teacher_temperature_schedule(
    warmup_temp: float, final_temp: float, warmup_steps: int, total_steps: int
) -> np.ndarray:
    """Linear warm-up of the teacher temperature, then constant (DINO: 0.04 -> 0.07 over 30 epochs).

    A too-high teacher temperature at the start makes the teacher's targets uniform and training collapses
    to a constant; starting sharp and softening later avoids that.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_temp, final_temp, warmup_steps)
    return np.concatenate([warmup, np.full(total_steps - warmup_steps, final_temp)]).astype(np.float64)
