"""The DINO objective: cross-entropy between a sharpened, centred teacher and the student over crop pairs,
the centre's EMA, and the teacher's EMA update.

The loss (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers"): for every
global crop ``t`` seen by the teacher and every crop ``s != t`` seen by the student,
``H(softmax((teacher_t - c) / T_t), softmax(student_s / T_s))``, averaged over the pairs. Centering
(subtracting ``c``, an EMA of the teacher's mean output) keeps one dimension from dominating; sharpening
(a low teacher temperature ``T_t``) keeps the targets from going uniform. Together they avoid collapse.

Collectives are guarded (``dist.is_available() and dist.is_initialized()``), so everything here runs in a
single process (unit tests, notebooks) as well as under Ray Train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def dino_loss(
    student_output: torch.Tensor,
    teacher_output: torch.Tensor,
    center: torch.Tensor,
    num_crops: int,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """The DINO loss of one batch, averaged over (teacher global crop, other student crop) pairs.

    ``student_output`` is ``(num_crops * B, K)``, crop-major (all images' first crop, then all second
    crops, ...: the order :mod:`visuray.ssl.loop` builds); ``teacher_output`` is
    ``(num_global * B, K)`` for the global crops, which are the first ``num_global`` student crops.
    """
    num_global = teacher_output.shape[0] * num_crops // student_output.shape[0]
    if num_global < 1 or num_global * student_output.shape[0] != teacher_output.shape[0] * num_crops:
        raise ValueError(
            f"teacher rows {teacher_output.shape[0]} are not a whole number of the "
            f"{student_output.shape[0] // num_crops}-image crops in the student's {student_output.shape[0]}"
        )
    student_logp = F.log_softmax(student_output.float() / student_temp, dim=-1).chunk(num_crops)
    targets = F.softmax((teacher_output.float() - center) / teacher_temp, dim=-1).detach().chunk(num_global)
    total = torch.zeros((), device=student_output.device)
    pairs = 0
    for t, target in enumerate(targets):
        for s, logp in enumerate(student_logp):
            if s == t:
                continue  # the same view on both sides teaches nothing
            total = total + torch.sum(-target * logp, dim=-1).mean()
            pairs += 1
    return total / pairs


def batch_center(teacher_output: torch.Tensor) -> torch.Tensor:
    """The mean teacher output over this step's rows on every worker (all-reduced when distributed)."""
    summed = torch.sum(teacher_output.detach().float(), dim=0, keepdim=True)
    count = torch.tensor([float(teacher_output.shape[0])], device=summed.device)
    if _distributed():
        dist.all_reduce(summed)
        dist.all_reduce(count)
    return summed / count


class DINOLoss(nn.Module):
    """:func:`dino_loss` plus the centre, an EMA buffer saved with the training state.

    ``forward(student, teacher, teacher_temp)`` computes the loss with the current centre and then
    moves the centre towards this batch's teacher mean, as DINO does (after the loss, so the loss
    uses the centre that the teacher outputs were compared against).
    """

    def __init__(
        self, out_dim: int, num_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.num_crops = num_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        loss = dino_loss(
            student_output, teacher_output, self.center, self.num_crops, self.student_temp, teacher_temp
        )
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        m = self.center_momentum
        self.center.mul_(m).add_(batch_center(teacher_output), alpha=1 - m)


class MultiCropWrapper(nn.Module):
    """Backbone + DINO head over a list of crops (see :func:`multicrop_forward`); one module, so that
    a DeepSpeed engine wraps (and ZeRO shards) both, and ``backbone.*`` names match the embedding
    model's, so the exported backbone is a model artifact that ``model.backbone.weights`` takes."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return multicrop_forward(self.backbone, self.head, crops)


def identity_param(param: torch.Tensor) -> torch.Tensor:
    """A parameter's full value in a plain (unsharded) module: the parameter itself."""
    return param.detach()


def update_teacher(
    student_params: Iterable[tuple[str, torch.Tensor]],
    teacher: nn.Module,
    momentum: float,
    full_param: Callable[[torch.Tensor], torch.Tensor | None] = identity_param,
) -> None:
    """``teacher = momentum * teacher + (1 - momentum) * student``, parameter by parameter, by name.

    ``full_param`` returns a student parameter's complete value (float32 where a master copy exists):
    the parameter itself for a plain module, the gathered fp32 master weight under DeepSpeed ZeRO (see
    :func:`visuray.train.deepspeed_engine.full_fp32_param`). Collective ``full_param`` functions must be
    called on every rank in the same order, which iterating ``named_parameters()`` guarantees. Teacher
    buffers (BatchNorm statistics) are not averaged: the teacher computes its own, as in DINO.
    """
    teacher_params = dict(teacher.named_parameters())
    with torch.no_grad():
        for name, param in student_params:
            if name not in teacher_params:
                raise KeyError(f"student parameter {name!r} has no teacher counterpart")
            value = full_param(param)
            if value is None:  # a frozen parameter has no master copy; it never changes either
                continue
            target = teacher_params[name]
            target.mul_(momentum).add_(
                value.to(target.device, target.dtype).view_as(target), alpha=1 - momentum
            )


def multicrop_forward(backbone: nn.Module, head: nn.Module, crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """Head outputs of all crops, crop-major: the backbone runs once per run of equal-sized crops (the
    globals together, the locals together), then the head once over every pooled feature."""
    features, start = [], 0
    while start < len(crops):
        stop = start
        while stop < len(crops) and crops[stop].shape[-2:] == crops[start].shape[-2:]:
            stop += 1
        batch = torch.cat(list(crops[start:stop]))
        features.append(backbone.forward_head(backbone.forward_features(batch), pre_logits=True))
        start = stop
    return head(torch.cat(features))
