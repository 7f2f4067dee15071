"""Per-step schedules of every training job, precomputed before the loop (one lookup per step, easy to
plot and test), indexed by optimizer step (not epoch: a streamed dataset has no fixed epoch length).

Two warm-up-then-cosine rules, both :func:`warmup_cosine` with different ends:

- :func:`cosine_schedule` (DINO's): the warm-up starts from ``warmup_start`` (0) and the cosine reaches
  its final value exactly at the last step. DINO decays the learning rate and raises the weight decay
  along it, raises the teacher's EMA momentum from 0.996 to 1 the same way, and warms the teacher
  temperature up linearly (:func:`teacher_temperature_schedule`).
- :func:`lr_schedule` (fine-tuning, fusion, attributes): the first warm-up step already takes
  ``base / warmup_steps`` and the cosine is cut one step before ``min_lr``. Kept as it was: a run resumed
  from a checkpoint must continue on the schedule it started with.
"""

from __future__ import annotations

import numpy as np


def warmup_cosine(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    warmup_reaches_base: bool = False,
    reaches_final: bool = True,
) -> np.ndarray:
    """``total_steps`` values: a linear warm-up over ``warmup_steps`` towards ``base_value``, then a half
    cosine from ``base_value`` down (or up) towards ``final_value``.

    ``warmup_reaches_base``: the warm-up's last step takes ``base_value`` (else its first step takes
    ``warmup_start`` and the last one stops short). ``reaches_final``: the last step takes exactly
    ``final_value`` (else the cosine stops one step short of it)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must lie in [0, total_steps={total_steps}]")
    if warmup_reaches_base:
        warmup = base_value * np.arange(1, warmup_steps + 1) / max(warmup_steps, 1)
    else:
        warmup = np.linspace(warmup_start, base_value, warmup_steps, endpoint=False)
    decay_steps = total_steps - warmup_steps
    # progress runs 0 -> 1 over the decay (reaching 1 at its last step when reaches_final)
    progress = np.arange(decay_steps) / max(decay_steps - 1 if reaches_final else decay_steps, 1)
    decay = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay]).astype(np.float64)


def cosine_schedule(
    base_value: float, final_value: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """DINO's schedules: warm-up from ``warmup_start``, ``final_value`` exactly at the last step."""
    return warmup_cosine(base_value, final_value, total_steps, warmup_steps, warmup_start)


def lr_schedule(base_lr: float, min_lr: float, steps: int, warmup_steps: int) -> list[float]:
    """The other jobs' learning rate of every step: linear warm-up whose last step takes ``base_lr``, then
    a cosine decay towards ``min_lr`` (not reached: see the module docstring)."""
    if warmup_steps >= steps:  # a run shorter than its warm-up only ever warms up
        return [base_lr * (step + 1) / warmup_steps for step in range(steps)]
    values = warmup_cosine(
        base_lr, min_lr, steps, warmup_steps, warmup_reaches_base=True, reaches_final=False
    )
    return [float(v) for v in values]


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
