"""Key maps: the tensor names of the checkpoint layouts users have, rewritten into a timm backbone's own.

Each map takes the tensors of a checkpoint (already out of its training-checkpoint container) and the
timm backbone (built with ``num_classes=0``) they are meant for, and returns the tensors under the
backbone's names plus the names it dropped on purpose. Values are not changed, except the two reshapes
said below. Classifier tensors are dropped afterwards for every layout (:func:`drop_classifier`).

=====================  ========================  =====================================================
layout                 recognised (``auto``) by  map
=====================  ========================  =====================================================
``timm``               everything else           identity (timm's own ``state_dict``, and the plain
                                                 backbone files DINO publishes)
``torchvision``        (asked for by name)       identity: torchvision's ResNets name their tensors as
                                                 timm's ResNets do; ``fc.*`` is the classifier
``dino``               ``teacher`` / ``student``  the ``teacher`` dict (DINO evaluates the teacher; else
                       dicts, or ``backbone.``    ``student``), ``module.`` and ``backbone.`` stripped,
                       prefixes                  ``head.*`` (the DINO projection head) dropped
``open_clip``          ``visual.*`` names         the image tower: ``visual.trunk.*`` (timm towers) as is;
                                                 a CLIP ViT's ``conv1`` -> ``patch_embed.proj``,
                                                 ``class_embedding`` -> ``cls_token`` (reshaped to 1x1xC),
                                                 ``positional_embedding`` -> ``pos_embed`` (1xLxC),
                                                 ``ln_pre`` -> ``norm_pre``, ``transformer.resblocks.i.``
                                                 {``ln_1``, ``attn.in_proj_*``, ``attn.out_proj``,
                                                 ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``} ->
                                                 ``blocks.i.`` {``norm1``, ``attn.qkv.*``, ``attn.proj``,
                                                 ``norm2``, ``mlp.fc1``, ``mlp.fc2``}, ``ln_post`` ->
                                                 ``norm``; ``proj`` (the image-text projection) and the
                                                 text tower dropped
``efficientnet_pytorch``  ``_conv_stem`` /       ``_conv_stem`` -> ``conv_stem``, ``_bn0`` -> ``bn1``,
                       ``_blocks.N`` names       ``_blocks.N`` (numbered flat) -> ``blocks.S.B`` (the
                                                 N-th block in timm's stage order); inside a block
                                                 ``_expand_conv`` / ``_bn0`` / ``_depthwise_conv`` /
                                                 ``_bn1`` / ``_project_conv`` / ``_bn2`` ->
                                                 ``conv_pw`` / ``bn1`` / ``conv_dw`` / ``bn2`` /
                                                 ``conv_pwl`` / ``bn3`` (expanding blocks) or -, -,
                                                 ``conv_dw``, ``bn1``, ``conv_pw``, ``bn2`` (depthwise-
                                                 separable first blocks), ``_se_reduce`` / ``_se_expand``
                                                 -> ``se.conv_reduce`` / ``se.conv_expand``;
                                                 ``_conv_head`` -> ``conv_head``, ``_bn1`` -> ``bn2``,
                                                 ``_fc`` (classifier) dropped
``visuray``            (a Visuray artifact)      ``backbone.*`` of an embedding or attribute model,
                                                 ``image_encoder.backbone.*`` of a fusion model
=====================  ========================  =====================================================

A ``module.`` prefix (DistributedDataParallel) is stripped in every layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

Tensors = dict[str, "torch.Tensor"]

# Training checkpoints keep the weights under one of these keys (timm's train script, Lightning, DeiT).
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module", "model_ema")


@dataclass
class Mapped:
    """Tensors under the backbone's names, and the checkpoint names left out on purpose (with why)."""

    tensors: Tensors
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> names

    def drop(self, reason: str, name: str) -> None:
        self.dropped.setdefault(reason, []).append(name)


def is_tensor_dict(value: Any) -> bool:
    import torch

    return isinstance(value, Mapping) and bool(value) and all(torch.is_tensor(v) for v in value.values())


def unwrap_container(checkpoint: Any) -> Any:
    """The dict of tensors inside a training checkpoint (``{"model": ..., "optimizer": ...}``), or the
    checkpoint itself (a state dict, or DINO's teacher/student dict that :func:`map_dino` reads)."""
    if not isinstance(checkpoint, Mapping) or is_tensor_dict(checkpoint) or _has_dino_dicts(checkpoint):
        return checkpoint
    for key in CONTAINER_KEYS:
        if is_tensor_dict(checkpoint.get(key)):
            return checkpoint[key]
    return checkpoint


def _has_dino_dicts(checkpoint: Mapping[str, Any]) -> bool:
    return any(isinstance(checkpoint.get(k), Mapping) for k in ("teacher", "student"))


def strip_prefix(tensors: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in tensors.items()}


def guess_layout(checkpoint: Any) -> str:
    """The layout ``auto`` picks for an unwrapped checkpoint (see the table in the module docstring)."""
    if isinstance(checkpoint, Mapping) and _has_dino_dicts(checkpoint):
        return "dino"
    names = [k[len("module.") :] if k.startswith("module.") else k for k in checkpoint]
    if any(n.startswith(("_conv_stem.", "_blocks.")) for n in names):
        return "efficientnet_pytorch"
    if any(n.startswith("visual.") for n in names):
        return "open_clip"
    if any(n.startswith("backbone.") for n in names):
        return "dino"
    return "timm"


def map_identity(checkpoint: Mapping[str, Any], backbone: nn.Module) -> Mapped:
    return Mapped(dict(strip_prefix(checkpoint, "module.")))


def map_dino(checkpoint: Mapping[str, Any], backbone: nn.Module) -> Mapped:
    if _has_dino_dicts(checkpoint):
        which = "teacher" if isinstance(checkpoint.get("teacher"), Mapping) else "student"
        checkpoint = checkpoint[which]
    mapped = Mapped({})
    for name, value in strip_prefix(checkpoint, "module.").items():
        if name.startswith("head."):
            mapped.drop("the DINO projection head", name)
        else:
            mapped.tensors[name[len("backbone.") :] if name.startswith("backbone.") else name] = value
    return mapped


_CLIP_BLOCK = {
    "ln_1.": "norm1.",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.": "attn.proj.",
    "ln_2.": "norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "ls_1.gamma": "ls1.gamma",
    "ls_2.gamma": "ls2.gamma",
}
_CLIP_TOP = {"conv1.": "patch_embed.proj.", "ln_pre.": "norm_pre.", "ln_post.": "norm."}


def map_open_clip(checkpoint: Mapping[str, Any], backbone: nn.Module) -> Mapped:
    mapped = Mapped({})
    for name, value in strip_prefix(checkpoint, "module.").items():
        if not name.startswith("visual."):
            mapped.drop("the text tower", name)
            continue
        name = name[len("visual.") :]
        if name.startswith("trunk."):  # a timm model as the image tower: timm's names already
            mapped.tensors[name[len("trunk.") :]] = value
        elif name == "proj" or name.startswith("head."):
            mapped.drop("the image-text projection", "visual." + name)
        elif name == "class_embedding":
            mapped.tensors["cls_token"] = value.reshape(1, 1, -1)
        elif name == "positional_embedding":
            mapped.tensors["pos_embed"] = value.unsqueeze(0)
        else:
            mapped.tensors[_rename_clip(name)] = value
    return mapped


def _rename_clip(name: str) -> str:
    found = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", name)
    if found:
        rest = found.group(2)
        for old, new in _CLIP_BLOCK.items():
            if rest.startswith(old):
                return f"blocks.{found.group(1)}.{new}{rest[len(old) :]}"
        return f"blocks.{found.group(1)}.{rest}"
    for old, new in _CLIP_TOP.items():
        if name.startswith(old):
            return new + name[len(old) :]
    return name


# efficientnet_pytorch's names inside one block -> timm's, for the two block kinds (see the table).
_EXPANDING_BLOCK = {
    "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
}  # fmt: skip
_SEPARABLE_BLOCK = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand",
}  # fmt: skip
_EFFICIENTNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}


def map_efficientnet_pytorch(checkpoint: Mapping[str, Any], backbone: nn.Module) -> Mapped:
    stages = getattr(backbone, "blocks", None)
    if stages is None:
        raise ValueError(
            f"efficientnet_pytorch weights need a timm EfficientNet backbone, not {type(backbone).__name__}"
        )
    # timm's blocks in order, as (name prefix, block): efficientnet_pytorch numbers the same blocks flat.
    flat = [(f"blocks.{s}.{b}", block) for s, stage in enumerate(stages) for b, block in enumerate(stage)]
    mapped = Mapped({})
    for name, value in strip_prefix(checkpoint, "module.").items():
        found = re.match(r"_blocks\.(\d+)\.(_\w+)\.(.+)", name)
        if found:
            index, part, rest = int(found.group(1)), found.group(2), found.group(3)
            if index >= len(flat):
                mapped.tensors[name] = value  # left for the strict load to report
                continue
            prefix, block = flat[index]
            names = _EXPANDING_BLOCK if hasattr(block, "conv_pwl") else _SEPARABLE_BLOCK
            mapped.tensors[f"{prefix}.{names.get(part, part)}.{rest}"] = value
            continue
        top, _, rest = name.partition(".")
        if top == "_fc":
            mapped.drop("the ImageNet classifier", name)
        else:
            mapped.tensors[f"{_EFFICIENTNET_TOP.get(top, top)}.{rest}"] = value
    return mapped


KEY_MAPS: dict[str, Callable[[Mapping[str, Any], Any], Mapped]] = {
    "timm": map_identity,
    "torchvision": map_identity,
    "dino": map_dino,
    "open_clip": map_open_clip,
    "efficientnet_pytorch": map_efficientnet_pytorch,
}


def drop_classifier(mapped: Mapped, backbone: nn.Module) -> None:
    """Drop the classifier tensors the backbone (``num_classes=0``) has no place for: those under the
    architecture's declared classifier name (timm's ``pretrained_cfg["classifier"]``: ``head``, ``fc``,
    ``classifier``, ...) that the backbone does not have."""
    declared = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    heads = (declared,) if isinstance(declared, str) else tuple(declared)
    heads = tuple(h + "." for h in heads) + ("head_dist.", "fc_norm_classifier.")
    own = set(backbone.state_dict())
    for name in list(mapped.tensors):
        if name not in own and name.startswith(heads):
            del mapped.tensors[name]
            mapped.drop("the classifier", name)


def resample_position_embedding(mapped: Mapped, backbone: nn.Module) -> str | None:
    """A ViT's ``pos_embed`` for another grid (weights trained at 224 px, used at another size) is
    resampled to the backbone's grid (timm's bicubic ``resample_abs_pos_embed``); returns what was done."""
    pos = mapped.tensors.get("pos_embed")
    own = backbone.state_dict().get("pos_embed")
    if pos is None or own is None or tuple(pos.shape) == tuple(own.shape):
        return None
    from timm.layers import resample_abs_pos_embed

    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    prefix = (
        0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 1))
    )
    if grid is None or pos.ndim != 3 or pos.shape[-1] != own.shape[-1]:
        return None  # not a resampling case: the strict load reports the shapes
    mapped.tensors["pos_embed"] = resample_abs_pos_embed(pos, new_size=list(grid), num_prefix_tokens=prefix)
    return f"pos_embed resampled from {tuple(pos.shape)} to {tuple(own.shape)}"
