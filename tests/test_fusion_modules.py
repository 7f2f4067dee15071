"""Fusion modules, encoders, tokenizer and the contrastive loss (tiny models, no Ray)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny import tiny_vit
from visuray.fusion.config import FusionModelConfig, TextEncoderConfig
from visuray.fusion.losses import BatchSoftmaxContrastiveLoss
from visuray.fusion.model import build_fusion_model
from visuray.fusion.modules import FUSIONS, MAAF, ResidualAttentionFusion
from visuray.fusion.tokenizer import TextTokenizer, train_tokenizer
from visuray.models.config import BackboneConfig

pytestmark = pytest.mark.unit

CORPUS = [
    "Nike Men Blue T-shirt",
    "Nike Men Red T-shirt",
    "Puma Women Black Casual Shoes",
    "same but in red",
    "make it blue",
    "in black",
] * 3


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(train_tokenizer(CORPUS, vocab_size=200, min_frequency=1), max_length=12)


def tiny_cfg(fusion: str, depth: int = 1, vocab_size: int = 200) -> FusionModelConfig:
    return FusionModelConfig(
        backbone=BackboneConfig(**tiny_vit(depth=1)),
        text=TextEncoderConfig(width=32, depth=1, heads=2, max_length=12, dropout=0.0, vocab_size=vocab_size),
        fusion=fusion,
        fusion_depth=depth,
        fusion_width=32,
        fusion_heads=2,
        fusion_dropout=0.0,
        embed_dim=16,
    )


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_encodes_with_special_tokens_and_pads(tokenizer: TextTokenizer) -> None:
    e = tokenizer.encode("make it red")
    assert e.ids[0] == tokenizer.cls_id and e.ids[-1] == tokenizer.sep_id
    assert e.num_tokens == len(e.ids) - 2 and not (e.truncated or e.empty or e.no_known_tokens)
    ids, padding = tokenizer(["in red", "make it blue please now"])
    assert ids.shape == padding.shape and ids.shape[0] == 2
    assert padding[0].sum() > 0 and not padding[1].any()
    assert (ids[padding] == tokenizer.pad_id).all()


def test_tokenizer_bad_text_is_reported_not_raised(tokenizer: TextTokenizer) -> None:
    for blank in ("", "   ", None):
        e = tokenizer.encode(blank)
        assert e.empty and e.ids == (tokenizer.cls_id, tokenizer.sep_id) and e.notes
    long = tokenizer.encode(" ".join(["red shirt"] * 50))
    assert long.truncated and len(long.ids) == tokenizer.max_length and long.num_tokens == 100
    assert any("truncated" in n for n in long.notes)
    unknown = tokenizer.encode("日本語 ☃")
    assert unknown.no_known_tokens and unknown.ids == (tokenizer.cls_id, tokenizer.sep_id)


def test_tokenizer_round_trips_through_json_and_file(tokenizer: TextTokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_json())
    loaded = TextTokenizer.load(str(path), max_length=12)
    assert loaded.encode("same but in red").ids == tokenizer.encode("same but in red").ids
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        TextTokenizer.load(str(tmp_path / "missing.json"), 12)


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_gives_unit_queries_of_embed_dim(fusion: str, tokenizer: TextTokenizer) -> None:
    torch.manual_seed(0)
    model = build_fusion_model(tiny_cfg(fusion, depth=1, vocab_size=tokenizer.vocab_size))
    ids, padding = tokenizer(["in red", "make it blue", "", "in black"])
    images = torch.randn(4, 3, 32, 32)
    query, target = model(images, ids, padding, torch.randn(4, 3, 32, 32))
    assert query.shape == (4, 16) and target.shape == (4, 16)
    assert torch.allclose(query.norm(dim=-1), torch.ones(4), atol=1e-5)
    model.eval()
    assert model.encode_images(images).shape == (4, 16)
    # gradients reach both encoders (image_only ignores the text by design, text_only the image tokens)
    model.train()
    query, target = model(images, ids, padding, images)
    (query.sum() + target.sum()).backward()
    grads = {n.split(".")[0]: p.grad is not None for n, p in model.named_parameters()}
    assert grads["image_encoder"]
    assert grads["text_encoder"] == (fusion != "image_only")


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_fusion_depth_sets_the_number_of_joint_layers(depth: int) -> None:
    maaf = MAAF(24, 32, 32, 16, depth=depth, heads=2, dropout=0.0)
    residual = ResidualAttentionFusion(
        24, 32, 32, 16, depth=depth, heads=2, dropout=0.0, residual_init_weight=0.3
    )
    assert len(maaf.layers.layers) == depth and len(residual.layers.layers) == depth
    assert residual.weight.item() == pytest.approx(0.3)


def test_maaf_refuses_depth_zero_and_residual_accepts_it() -> None:
    with pytest.raises(ValueError, match="depth"):
        MAAF(24, 32, 32, 16, depth=0, heads=2, dropout=0.0)
    with pytest.raises(ValueError, match="maaf"):
        tiny_cfg("maaf", depth=0)
    residual = ResidualAttentionFusion(
        24, 32, 32, 16, depth=0, heads=2, dropout=0.0, residual_init_weight=1.0
    )
    out = residual(
        torch.randn(2, 5, 24),
        torch.randn(2, 16),
        torch.randn(2, 3, 32),
        None,
        torch.zeros(2, 3, dtype=torch.bool),
    )
    assert out.shape == (2, 16)


def test_residual_fusion_with_zero_weight_is_the_image_embedding() -> None:
    torch.manual_seed(0)
    residual = ResidualAttentionFusion(
        24, 32, 32, 16, depth=1, heads=2, dropout=0.0, residual_init_weight=0.0
    )
    image_embedding = torch.randn(3, 16)
    out = residual(torch.randn(3, 5, 24), image_embedding, torch.randn(3, 4, 32), None, None)
    assert torch.equal(out, image_embedding)


def test_text_padding_does_not_change_a_query(tokenizer: TextTokenizer) -> None:
    torch.manual_seed(0)
    model = build_fusion_model(tiny_cfg("maaf", depth=2, vocab_size=tokenizer.vocab_size)).eval()
    image = torch.randn(1, 3, 32, 32)
    alone_ids, alone_pad = tokenizer(["in red"])
    batch_ids, batch_pad = tokenizer(["in red", "make it blue please now in black"])
    with torch.no_grad():
        alone = model.encode_queries(image, alone_ids, alone_pad)
        batched = model.encode_queries(image.repeat(2, 1, 1, 1), batch_ids, batch_pad)[:1]
    assert torch.allclose(alone, batched, atol=1e-5)


def test_image_encoder_flattens_cnn_feature_maps() -> None:
    from visuray.fusion.image_encoder import ImageEncoder
    from visuray.models.backbone import create_backbone

    encoder = ImageEncoder(create_backbone(BackboneConfig(name="resnet18", weights=None, img_size=32)))
    tokens, pooled = encoder(torch.randn(2, 3, 64, 64))
    assert tokens.shape == (2, 4, 512) and pooled.shape == (2, 512)


# ---------------------------------------------------------------- loss


def slow_contrastive_loss(query: torch.Tensor, target: torch.Tensor, temperature: float, ignore) -> float:
    """-log softmax of each query's own target among the columns it does not ignore, averaged."""
    total = 0.0
    n = len(query)
    for i in range(n):
        logits = [float(query[i] @ target[j]) / temperature for j in range(n)]
        kept = [logits[j] for j in range(n) if j == i or ignore is None or not ignore[i][j]]
        total += -(logits[i] - math.log(sum(math.exp(v) for v in kept)))
    return total / n


@pytest.mark.parametrize("with_ignore", [False, True])
def test_contrastive_loss_matches_slow_reference(with_ignore: bool) -> None:
    torch.manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    target = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    ignore = torch.zeros(6, 6, dtype=torch.bool)
    if with_ignore:
        ignore[0, 3] = ignore[3, 0] = ignore[2, 5] = ignore[4, 4] = True  # the diagonal is never ignored
    loss_fn = BatchSoftmaxContrastiveLoss(init_temperature=0.1)
    got = loss_fn(query, target, ignore if with_ignore else None)
    expected = slow_contrastive_loss(query, target, 0.1, ignore.tolist() if with_ignore else None)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_temperature_is_learned_and_capped() -> None:
    loss_fn = BatchSoftmaxContrastiveLoss(init_temperature=0.07)
    assert loss_fn.temperature == pytest.approx(0.07, rel=1e-5)
    query = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    loss_fn(query, query.clone()).backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.log_scale.grad.abs() > 0
    capped = BatchSoftmaxContrastiveLoss(init_temperature=0.001)
    assert capped.temperature == pytest.approx(0.01)  # 1 / max_scale
    fixed = BatchSoftmaxContrastiveLoss(init_temperature=0.07, learnable=False)
    assert not any(p.requires_grad for p in fixed.parameters())


@pytest.mark.parametrize("depth", [1, 3])
def test_fusion_layers_start_as_the_identity(depth: int) -> None:
    """Zeroed output projections: stacked fresh layers pass the joint tokens through unchanged at first."""
    torch.manual_seed(0)
    tokens, mask = torch.randn(2, 7, 32), torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    for module in (
        MAAF(24, 32, 32, 16, depth=depth, heads=2, dropout=0.0),
        ResidualAttentionFusion(24, 32, 32, 16, depth=depth, heads=2, dropout=0.0, residual_init_weight=0.1),
    ):
        torch.testing.assert_close(module.layers(tokens, src_key_padding_mask=mask), tokens)


def test_modality_pool_gives_image_and_text_half_each() -> None:
    from visuray.fusion.modules import modality_pool

    torch.manual_seed(0)
    tokens = torch.randn(2, 9, 4)  # 5 image tokens, then 4 text tokens
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 7:] = True  # the first query's text has 2 tokens, then padding
    pooled = modality_pool(tokens, mask, n_image=5)
    for b, n_text in ((0, 2), (1, 4)):
        image_mean = tokens[b, :5].sum(0) / 5
        text_mean = tokens[b, 5 : 5 + n_text].sum(0) / n_text
        torch.testing.assert_close(pooled[b], (image_mean + text_mean) / 2)


def test_maaf_adds_its_fused_change_to_the_image_embedding() -> None:
    torch.manual_seed(0)
    maaf = MAAF(24, 32, 32, 16, depth=1, heads=2, dropout=0.0)
    image_embedding = torch.randn(3, 16)
    inputs = (
        torch.randn(3, 5, 24),
        image_embedding,
        torch.randn(3, 4, 32),
        None,
        torch.zeros(3, 4, dtype=torch.bool),
    )
    change = maaf(*inputs) - image_embedding
    assert change.abs().sum() > 0
    torch.nn.init.zeros_(maaf.out.weight)
    torch.nn.init.zeros_(maaf.out.bias)
    torch.testing.assert_close(maaf(*inputs), image_embedding)


def test_preservation_gate_starts_as_the_ungated_module_then_scales_the_image_embedding() -> None:
    from visuray.fusion.modules import modality_pool

    torch.manual_seed(0)
    inputs = (
        torch.randn(3, 5, 24),
        torch.randn(3, 16),
        torch.randn(3, 4, 32),
        None,
        torch.tensor([[False] * 4, [False] * 2 + [True] * 2, [False] * 3 + [True]]),
    )
    for gated, plain in (
        (
            MAAF(24, 32, 32, 16, depth=2, heads=2, dropout=0.0, gate=True),
            MAAF(24, 32, 32, 16, depth=2, heads=2, dropout=0.0),
        ),
        (
            ResidualAttentionFusion(24, 32, 32, 16, 1, 2, 0.0, residual_init_weight=1.0, gate=True),
            ResidualAttentionFusion(24, 32, 32, 16, 1, 2, 0.0, residual_init_weight=1.0),
        ),
    ):
        state = gated.state_dict()
        assert {k for k in state if k.startswith("gate.")} == {"gate.proj.weight", "gate.proj.bias"}
        plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("gate.")})
        torch.testing.assert_close(gated(*inputs), plain(*inputs))  # the zero-initialised gate is 1
        # the gate learns: the loss reaches its weights
        gated(*inputs).sum().backward()
        assert gated.gate.proj.weight.grad.abs().sum() > 0

    # MAAF with a trained gate: 2 sigmoid(W pooled + b) * image embedding, plus the same residual
    maaf = MAAF(24, 32, 32, 16, depth=1, heads=2, dropout=0.0, gate=True).eval()
    torch.nn.init.normal_(maaf.gate.proj.weight)
    torch.nn.init.normal_(maaf.gate.proj.bias)
    fused, mask = maaf.fused_tokens(inputs[0], inputs[2], inputs[4])
    pooled = modality_pool(fused, mask, 5)
    expected = 2 * torch.sigmoid(pooled @ maaf.gate.proj.weight.T + maaf.gate.proj.bias) * inputs[1]
    torch.testing.assert_close(maaf(*inputs), expected + maaf.out(pooled))


def test_fusion_gate_is_a_model_setting_of_the_fusion_modules_only() -> None:
    assert (
        build_fusion_model(tiny_cfg("maaf").model_copy(update={"fusion_gate": True})).composer.gate
        is not None
    )
    assert build_fusion_model(tiny_cfg("maaf")).composer.gate is None
    with_flag = build_fusion_model(tiny_cfg("tirg").model_copy(update={"fusion_gate": True}))
    assert with_flag.state_dict().keys() == build_fusion_model(tiny_cfg("tirg")).state_dict().keys()


def test_composer_lr_scale_multiplies_only_the_composers_rate() -> None:
    from visuray.fusion.config import FusionTrainSection
    from visuray.fusion.loop import optimizer_for
    from visuray.fusion.losses import FusionObjective

    objective = FusionObjective(build_fusion_model(tiny_cfg("maaf")), BatchSoftmaxContrastiveLoss(0.07))
    composer = {id(p) for p in objective.model.composer.parameters()}
    assert len(optimizer_for(objective, FusionTrainSection(lr=1e-3)).param_groups) == 2  # as before
    groups = optimizer_for(objective, FusionTrainSection(lr=1e-3, composer_lr_scale=4.0)).param_groups
    seen = 0
    for group in groups:
        in_composer = {id(p) in composer for p in group["params"]}
        assert len(in_composer) == 1  # a group is all composer or all encoder
        assert group["lr_scale"] == (4.0 if in_composer.pop() else 1.0)
        seen += len(group["params"])
    assert seen == sum(1 for p in objective.parameters() if p.requires_grad)
