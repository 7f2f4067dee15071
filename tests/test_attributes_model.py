"""Attribute model pieces: attention weights and masks, heads at depths from one backbone pass, losses
against slow references, label spaces, backgrounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import tiny_vit
from visuray.attributes.backgrounds import BackgroundBank, composite, foreground_mask
from visuray.attributes.config import AttributeModelConfig
from visuray.attributes.data import batch_indices, decode_to_uint8, split_of
from visuray.attributes.labels import (
    AttributeGroupSpec,
    build_label_space,
    clothing_small_groups,
    encode_targets,
)
from visuray.attributes.losses import AsymmetricLoss, WeightedBCELoss, positive_weights
from visuray.attributes.model import SemanticAttentionHead, build_attribute_model, build_separate_models
from visuray.images import InputSpec, encode_jpeg, to_model_input

pytestmark = pytest.mark.unit


def tiny_config(head: str = "attention", depths: tuple[int | None, ...] = (1, None)) -> AttributeModelConfig:
    groups = [
        {"name": f"g{i}", "labels": [f"g{i}=a", f"g{i}=b", f"g{i}=c"], "depth": d}
        for i, d in enumerate(depths)
    ]
    return AttributeModelConfig.model_validate(
        {"backbone": tiny_vit(depth=3), "head": head, "embed_dim": 16, "groups": groups}
    )


# ---------------- attention ----------------


def test_attention_weights_sum_to_one_and_respect_the_mask() -> None:
    torch.manual_seed(0)
    head = SemanticAttentionHead(8, 3, embed_dim=16, num_maps=2, reduction=4)
    features = torch.randn(3, 8, 4, 4)
    head(features)
    weights = head.last_attention
    assert weights.shape == (3, 2, 4, 4)
    torch.testing.assert_close(weights.sum(dim=(2, 3)), torch.ones(3, 2))
    assert (weights > 0).all()

    mask = torch.zeros(3, 1, 32, 32)
    mask[0, :, :16, :16] = 1  # image 0: top-left quarter -> top-left 2 x 2 cells
    mask[1] = 1  # image 1: everything
    # image 2: nothing valid -> falls back to attending everywhere
    logits = head(features, mask)
    weights = head.last_attention
    torch.testing.assert_close(weights.sum(dim=(2, 3)), torch.ones(3, 2))
    assert (weights[0, :, 2:, :] == 0).all() and (weights[0, :, :, 2:] == 0).all()
    assert (weights[0, :, :2, :2] > 0).all()
    assert (weights[1] > 0).all() and (weights[2] > 0).all()
    torch.testing.assert_close(logits[1:], head(features)[1:])  # a full mask changes nothing

    # Masked-out positions do not influence the prediction at all.
    changed = features.clone()
    changed[0, :, 3, 3] += 100.0
    head_no_gate = SemanticAttentionHead(8, 3, embed_dim=16, num_maps=2, reduction=4, channel_gate=False)
    torch.testing.assert_close(head_no_gate(changed, mask)[0], head_no_gate(features, mask)[0])


def test_spatial_attention_pools_where_the_weights_are() -> None:
    """The pooled embedding is the attention-weighted sum of the semantic map (slow reference)."""
    torch.manual_seed(0)
    head = SemanticAttentionHead(6, 2, embed_dim=5, num_maps=2, reduction=1)
    features = torch.randn(2, 6, 3, 3)
    logits = head(features)
    tokens = features.flatten(2).transpose(1, 2)
    semantic = torch.nn.functional.gelu(head.semantic(head.norm(tokens)))
    semantic = semantic * torch.sigmoid(head.gate(semantic.mean(1)))[:, None, :]
    weights = head.last_attention.flatten(2)
    pooled = torch.stack(
        [
            torch.cat([sum(weights[n, m, p] * semantic[n, p] for p in range(9)) for m in range(2)])
            for n in range(2)
        ]
    )
    torch.testing.assert_close(logits, head.classifier(head.out_norm(pooled)), rtol=1e-4, atol=1e-5)


# ---------------- heads at depths, one pass ----------------


@pytest.mark.parametrize("head", ["attention", "pooled", "spatial", "channel"])
def test_heads_at_depths_share_one_backbone_pass(head: str) -> None:
    torch.manual_seed(0)
    model = build_attribute_model(tiny_config(head, depths=(1, 2, None)))
    calls, blocks_run = [], []
    original = model.backbone.forward_intermediates

    def counting(*args, **kwargs):
        calls.append(kwargs.get("indices"))
        return original(*args, **kwargs)

    model.backbone.forward_intermediates = counting
    for block in model.backbone.blocks:
        block.register_forward_hook(lambda *_: blocks_run.append(1))
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 9)
    assert calls == [[0, 1, 2]]  # one call, every tap in it
    assert len(blocks_run) == 3  # each block ran once

    # Each group's logits are what its head computes from its own tap.
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        taps = original(x, indices=[0, 1, 2], intermediates_only=True, output_fmt="NCHW")
        groups = model.forward_groups(x)
        for name, tap in zip(["g0", "g1", "g2"], [0, 1, 2], strict=True):
            torch.testing.assert_close(groups[name], model.heads[name](taps[tap]))


def test_shallow_heads_stop_the_backbone_early() -> None:
    model = build_attribute_model(tiny_config(depths=(1, 2)))
    blocks_run = []
    for block in model.backbone.blocks:
        block.register_forward_hook(lambda *_: blocks_run.append(1))
    model(torch.randn(1, 3, 32, 32))
    assert len(blocks_run) == 2  # the third block is not needed


def test_depth_beyond_the_backbone_is_an_error() -> None:
    with pytest.raises(ValueError, match="depth 4"):
        build_attribute_model(tiny_config(depths=(4,)))


def test_separate_models_split_the_groups() -> None:
    models = build_separate_models(tiny_config(depths=(1, None)))
    assert [list(m.heads) for m in models] == [["g0"], ["g1"]]
    assert models[0].tap_indices == [0] and models[1].tap_indices == [2]


def test_cnn_backbones_work_through_the_same_contract() -> None:
    cfg = AttributeModelConfig.model_validate(
        {
            "backbone": {"name": "test_resnet", "weights": None, "img_size": 32},
            "groups": [{"name": "a", "labels": ["a=1", "a=2"], "depth": 2}, {"name": "b", "labels": ["b=1"]}],
        }
    )
    assert build_attribute_model(cfg)(torch.randn(2, 3, 32, 32)).shape == (2, 3)


# ---------------- losses against slow references ----------------


def _bce_reference(logits, targets, known, pos_weight):
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            if not known[i, j]:
                continue
            p = 1 / (1 + np.exp(-logits[i, j]))
            w = pos_weight[j] if pos_weight is not None else 1.0
            total += -(w * targets[i, j] * np.log(p) + (1 - targets[i, j]) * np.log(1 - p))
            count += 1
    return total / count


def _asl_reference(logits, targets, known, gamma_neg, gamma_pos, clip):
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        for j in range(logits.shape[1]):
            if not known[i, j]:
                continue
            p = 1 / (1 + np.exp(-logits[i, j]))
            if targets[i, j] == 1:
                total += -((1 - p) ** gamma_pos) * np.log(p)
            else:
                pm = max(p - clip, 0.0)
                total += -(pm**gamma_neg) * np.log(1 - pm)
            count += 1
    return total / count


def test_losses_match_slow_references() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (6, 5))
    targets = (rng.random((6, 5)) < 0.3).astype(np.float32)
    known = rng.random((6, 5)) < 0.8
    pos_weight = np.array([1.0, 2.0, 3.0, 1.5, 5.0], dtype=np.float32)
    t = [torch.tensor(a) for a in (logits, targets, known)]
    bce = WeightedBCELoss(torch.tensor(pos_weight))(t[0], t[1], t[2])
    assert bce.item() == pytest.approx(_bce_reference(logits, targets, known, pos_weight), rel=1e-5)
    assert WeightedBCELoss()(t[0], t[1]).item() == pytest.approx(
        _bce_reference(logits, targets, np.ones_like(known), None), rel=1e-5
    )
    asl = AsymmetricLoss(gamma_neg=4, gamma_pos=1, clip=0.05)(t[0], t[1], t[2])
    assert asl.item() == pytest.approx(_asl_reference(logits, targets, known, 4, 1, 0.05), rel=1e-5)
    # With no focusing and no clip the asymmetric loss is plain BCE.
    plain = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(t[0], t[1], t[2])
    assert plain.item() == pytest.approx(_bce_reference(logits, targets, known, None), rel=1e-5)


def test_positive_weights_are_neg_over_pos_clipped() -> None:
    targets = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=np.float32)
    known = np.ones_like(targets, dtype=bool)
    known[3, 2] = False
    np.testing.assert_allclose(positive_weights(targets, known, max_weight=2.5), [2.5, 2.5, 1.0])


# ---------------- labels, data, backgrounds ----------------


def test_label_space_and_targets_with_derived_and_unknown_values() -> None:
    rows = [{"label": c, "attributes": {}} for c in ["dress"] * 3 + ["shirt"] * 3 + ["hat"] * 2 + ["shoes"]]
    specs = clothing_small_groups()
    space = build_label_space(rows, specs, min_count=2)
    assert [g.name for g in space.groups] == ["garment", "body_region", "sleeves"]
    assert space.groups[0].labels == ("garment=dress", "garment=shirt", "garment=hat")  # shoes: 1 < 2
    assert space.groups[1].labels == (
        "body_region=upper body",
        "body_region=lower body",
        "body_region=headwear",
    )
    assert space.groups[2].labels == ("sleeves=none",)  # hat + shoes; dress and shirt are unknown
    targets, known = encode_targets(rows, specs, space)
    names = space.names
    dress, shoes = 0, 8
    assert {names[j] for j in np.flatnonzero(targets[dress])} == {
        "garment=dress", "body_region=upper body", "body_region=lower body"
    }  # fmt: skip
    assert not known[dress, names.index("sleeves=none")]  # unknown, not negative
    assert known[shoes].all() and targets[shoes].tolist() == [0, 0, 0, 0, 0, 0, 1]
    spec = AttributeGroupSpec(name="colour", column="baseColour")
    with pytest.raises(ValueError, match="colour"):
        build_label_space([{"attributes": {"baseColour": "Red"}}], [spec], min_count=2)


def test_splits_are_stable_and_near_their_fractions() -> None:
    splits = [split_of(str(i), 0, 0.1, 0.2) for i in range(5000)]
    assert splits == [split_of(str(i), 0, 0.1, 0.2) for i in range(5000)]
    assert abs(splits.count("test") / 5000 - 0.2) < 0.02 and abs(splits.count("val") / 5000 - 0.1) < 0.02
    assert batch_indices(10, 4, seed=0, step=3) == batch_indices(10, 4, seed=0, step=3)
    epoch = [i for step in range(2) for i in batch_indices(9, 4, seed=1, step=step)]
    assert len(set(epoch)) == 8


def test_uint8_decoding_matches_the_serving_preprocessing() -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(2)]
    batch = InputSpec(32).normalise(decode_to_uint8([encode_jpeg(i) for i in images], 32))
    from visuray.images import decode_image

    reference = to_model_input([decode_image(encode_jpeg(i)) for i in images], 32)
    torch.testing.assert_close(batch, reference)


def test_foreground_mask_keeps_enclosed_white_and_composite_pastes_the_product() -> None:
    pixels = np.full((40, 40, 3), 252, dtype=np.uint8)
    pixels[10:30, 10:30] = (200, 30, 30)  # a red product ...
    pixels[15:25, 15:25] = 250  # ... with a white logo inside
    product = Image.fromarray(pixels)
    mask = foreground_mask(product)
    assert mask[10:30, 10:30].all() and not mask[:8].any() and not mask[:, 32:].any()
    background = Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8))
    out = np.asarray(composite(product, background, mask, feather=0))
    assert (out[:8] == 0).all() and (out[12:28, 12:28] == pixels[12:28, 12:28]).all()
    wild = BackgroundBank().wild(product, "item-1", seed=0)
    assert np.asarray(wild).shape == (40, 40, 3)
    assert np.array_equal(np.asarray(wild), np.asarray(BackgroundBank().wild(product, "item-1", seed=0)))
    assert not np.array_equal(np.asarray(wild)[:8], pixels[:8])  # the white backdrop is gone
