"""Re-estimating a network's BatchNorm statistics on clean images.

A network's BatchNorm running statistics are what it normalises with in eval mode. After DINO
pretraining they are the teacher's running averages over *augmented* crops (colour jitter, blur,
solarisation, random scales), not over the centre-cropped images that evaluation, indexing and serving
feed it; and a randomly initialised network still has its init values (mean 0, variance 1). Recomputing
them as a plain average over clean images, weights untouched, fixes both (``benchmarks/pretrain_quality.py``
measures what it is worth).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (1d, 2d, 3d, sync) of ``model``."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def reestimate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace ``model``'s BatchNorm running statistics, in place, by their average over ``batches``.

    Each layer's running mean and variance become the mean over batches of the per-batch statistics
    (PyTorch's cumulative average, ``momentum=None``); the weights and each layer's momentum are left as
    they were, and the model is returned to eval mode. Returns the number of images seen (0, and nothing
    run, for a model without BatchNorm). If no batch comes, or one fails, the statistics the model had
    are restored before the error propagates.
    """
    import torch

    layers = batchnorm_layers(model)
    if not layers:
        return 0
    saved = [
        (m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in layers
    ]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    seen = 0
    model.train()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
                seen += len(batch)
        if seen == 0:
            raise ValueError("no images to re-estimate the BatchNorm statistics on")
    except BaseException:  # nothing lost: the statistics the model came with are put back
        for layer, (_, mean, var, count) in zip(layers, saved, strict=True):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.copy_(count)
        raise
    finally:
        for layer, (momentum, *_) in zip(layers, saved, strict=True):
            layer.momentum = momentum
        model.eval()
    return seen
