"""The pieces every attribute training loop shares: the loss from its config, one optimisation step,
batched prediction, and the held-out evaluation (thresholds on validation, metrics on test).

The Ray Train job (:mod:`visuray.attributes.loop`) wraps :func:`training_step` with checkpoints and
reports; :func:`fit_in_process` wraps it with a plain loop for benchmarks and the demo, so both train
the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from visuray.attributes.config import LossSection
from visuray.attributes.losses import positive_weights
from visuray.attributes.metrics import multilabel_report
from visuray.attributes.thresholds import select_thresholds
from visuray.images import InputSpec

if TYPE_CHECKING:
    import torch
    from torch import nn


def build_loss(cfg: LossSection, targets: np.ndarray, known: np.ndarray) -> nn.Module:
    """The loss for ``cfg``; BCE positive weights come from the training targets."""
    import torch

    from visuray.attributes.losses import AsymmetricLoss, WeightedBCELoss

    if cfg.kind == "asymmetric":
        return AsymmetricLoss(cfg.gamma_neg, cfg.gamma_pos, cfg.clip)
    weights = (
        torch.from_numpy(positive_weights(targets, known, cfg.max_pos_weight)) if cfg.pos_weight else None
    )
    return WeightedBCELoss(weights)


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    known: torch.Tensor,
    lr: float,
    clip_grad_norm: float | None,
) -> torch.Tensor:
    """One AdamW step on a normalised batch; returns the (detached) loss."""
    import torch

    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = loss_fn(model(images), targets, known)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    optimizer.step()
    return loss.detach()


def fit_in_process(
    model: nn.Module,
    images: torch.Tensor,
    spec: InputSpec,
    targets: np.ndarray,
    known: np.ndarray,
    loss_cfg: LossSection,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.05,
    warmup_steps: int = 0,
    clip_grad_norm: float | None = 3.0,
    seed: int = 0,
    composite: Callable[[torch.Tensor, list[int], int], torch.Tensor] | None = None,
) -> list[float]:
    """Train ``model`` in this process on uint8 ``images`` (N, 3, S, S), normalised by the model's input
    ``spec``; returns the loss of every step. ``composite(batch, rows, step)``, when given, edits each
    uint8 batch before the flips and shifts (e.g. :class:`visuray.attributes.backgrounds.BackgroundCompositing`);
    it draws from its own generator, so the flips and shifts are those of a run without it."""
    import torch

    from visuray.attributes.data import augment, batch_indices
    from visuray.train.common import decay_param_groups
    from visuray.train.schedules import lr_schedule

    torch.manual_seed(seed)
    loss_fn = build_loss(loss_cfg, targets, known)
    optimizer = torch.optim.AdamW(decay_param_groups(model, weight_decay), lr=lr)
    schedule = lr_schedule(lr, lr * 0.01, steps, warmup_steps)
    generator = torch.Generator().manual_seed(seed)
    t_targets, t_known = torch.from_numpy(targets), torch.from_numpy(known)
    losses = []
    model.train()
    for step in range(steps):
        rows = batch_indices(len(images), batch_size, seed, step)
        pixels = images[rows] if composite is None else composite(images[rows], rows, step)
        batch = spec.normalise(augment(pixels, generator))
        loss = training_step(
            model, optimizer, loss_fn, batch, t_targets[rows], t_known[rows], schedule[step], clip_grad_norm
        )
        losses.append(float(loss))
    return losses


def predict_probabilities(
    model: nn.Module, images: torch.Tensor, spec: InputSpec, batch_size: int = 256, device: Any = "cpu"
) -> np.ndarray:
    """Sigmoid scores (N, L) of uint8 images (normalised by the model's input ``spec``), in eval mode,
    without gradients."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = spec.normalise(images[start : start + batch_size].to(device))
            out.append(torch.sigmoid(model(batch)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def thresholds_and_report(
    val_scores: np.ndarray,
    val_targets: np.ndarray,
    val_known: np.ndarray,
    test_scores: np.ndarray,
    test_targets: np.ndarray,
    test_known: np.ndarray,
    label_names: Sequence[str],
    min_positives: int,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-label thresholds chosen on validation, and the test report (AUC/AP plus F1 at those thresholds)."""
    thresholds = select_thresholds(val_scores, val_targets, val_known)
    report = multilabel_report(test_scores, test_targets, test_known, label_names, min_positives)
    predicted = test_scores >= thresholds[None, :]
    positives = (test_targets > 0.5) & test_known
    tp = (predicted & positives).sum()
    fp = (predicted & ~positives & test_known).sum()
    fn = (~predicted & positives).sum()
    report["micro_f1_at_thresholds"] = float(2 * tp / max(2 * tp + fp + fn, 1))
    return thresholds, report
