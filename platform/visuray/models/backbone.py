"""Backbones come from timm's registry, and are consumed only through timm's feature contract.

``timm.create_model(name, num_classes=0)`` gives a model whose ``forward_features`` returns the unpooled
features and whose ``forward_head(features, pre_logits=True)`` pools them into one ``num_features``
vector per image. Every Visuray head (embedding, attributes, fusion) goes through those two calls, so any
registry name works, ViT or CNN, without slicing a model's internals. Their configs are in
:mod:`visuray.models.config`; their starting weights come from :mod:`visuray.models.weights`.
"""

from __future__ import annotations

import re
from typing import Any

import timm
import timm.models
from torch import nn

from visuray.models.config import BackboneConfig


def backbone_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """The keyword arguments handed to ``timm.create_model`` for ``cfg``.

    ``img_size`` only goes to architectures whose pretrained config declares a fixed input size (ViTs,
    Swin, ...): CNN constructors do not accept it and need no size. ``patch_size`` and ``depth`` go only
    when set, so a CNN is configured by leaving them None.
    """
    kwargs: dict[str, Any] = {"drop_path_rate": cfg.drop_path_rate}
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
    if pretrained_cfg is not None and getattr(pretrained_cfg, "fixed_input_size", False):
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    return kwargs


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    """Build the backbone's architecture at random init (no hub downloads). Pretrained weights are loaded
    by the jobs (:func:`visuray.models.weights.load_pretrained`); a published model's come from its file."""
    if not timm.is_model(cfg.name):
        raise ValueError(f"backbone {cfg.name!r} is not a timm registry name")
    kwargs = backbone_kwargs(cfg)
    try:
        return timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:
        raise ValueError(
            f"backbone {cfg.name!r} does not accept {sorted(kwargs)}: {exc}. "
            "Set model.backbone.patch_size and model.backbone.depth to null for CNNs."
        ) from exc


def parameter_depths(backbone: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth in ``backbone`` and the number of block groups B: 0 for the stem (a ViT's
    patch embedding and tokens, a CNN's first convolution), i + 1 for block group i (a ViT block, a CNN
    stage), B + 1 for what follows the blocks (final norm, head convolution).

    Read from the patterns of timm's own ``group_matcher(coarse=True)`` (what timm's layer-wise decay
    uses), so it holds for every registry architecture that declares one, ViT or CNN. timm folds the
    layers after the blocks into the last block group; here they are a depth of their own, as DINO and
    BEiT's layer decay count them."""
    matcher = getattr(backbone, "group_matcher", None)
    spec = matcher(coarse=True) if matcher is not None else None
    if not isinstance(spec, dict):
        raise ValueError(
            f"{type(backbone).__name__} declares no timm group_matcher patterns: no block depths"
        )
    stem = re.compile(spec["stem"]) if spec.get("stem") else None
    rules = spec.get("blocks") or []
    rules = (
        [(rules, None)] if isinstance(rules, str) else [(r, None) if isinstance(r, str) else r for r in rules]
    )
    compiled = [(re.compile(pattern), fixed) for pattern, fixed in rules]
    block_of: dict[str, int | None] = {}  # None: after the blocks
    for name, _ in backbone.named_parameters():
        if stem is not None and stem.match(name):
            block_of[name] = -1
            continue
        block_of[name] = None
        for pattern, fixed in compiled:
            found = pattern.match(name)
            if found:
                block_of[name] = int(found.group(1)) if fixed is None and found.groups() else None
                break
    # Block numbers as timm writes them (ResNet counts layer1..layer4) -> 1..B in order.
    numbers = sorted({b for b in block_of.values() if b is not None and b >= 0})
    rank = {b: i + 1 for i, b in enumerate(numbers)}
    depths = {
        name: 0 if b == -1 else len(numbers) + 1 if b is None else rank[b] for name, b in block_of.items()
    }
    return depths, len(numbers)


def freeze_first_blocks(backbone: nn.Module, num_blocks: int) -> None:
    """``requires_grad=False`` for the stem and the first ``num_blocks`` block groups (ViT blocks, CNN
    stages); their BatchNorm layers keep the pretrained statistics (held in eval mode, see
    :func:`hold_in_eval_mode`), since a frozen layer whose normalisation drifts is not frozen."""
    depths, total = parameter_depths(backbone)
    if num_blocks > total:
        raise ValueError(f"train.freeze_blocks={num_blocks} but the backbone has only {total} blocks")
    for name, param in backbone.named_parameters():
        if depths[name] <= num_blocks:
            param.requires_grad_(False)
    for module in backbone.modules():
        params = list(module.parameters(recurse=False))
        frozen = params and not any(p.requires_grad for p in params)
        if frozen and isinstance(module, nn.modules.batchnorm._BatchNorm):
            hold_in_eval_mode(module)


def hold_batchnorm_statistics(backbone: nn.Module, cfg: BackboneConfig) -> int:
    """Hold every BatchNorm layer of ``backbone`` in eval mode when ``cfg`` freezes their statistics
    (:attr:`BackboneConfig.freezes_batchnorm`); returns how many layers it holds."""
    if not cfg.freezes_batchnorm:
        return 0
    layers = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        hold_in_eval_mode(layer)
    return len(layers)


def hold_in_eval_mode(module: nn.Module) -> None:
    """Keep ``module`` in eval mode whatever ``train()`` its parents get (the engine's, every step after
    validation): a pre-forward hook sets it back before each call."""

    def to_eval(mod: nn.Module, args: Any) -> None:
        mod.training = False

    module.register_forward_pre_hook(to_eval)
