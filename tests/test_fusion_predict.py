"""The fusion model artifact, the predictor's handling of bad input, and pretrained encoders from a path
or s3:// (tiny models, no Ray)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tests.tiny import tiny_vit
from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.checkpoint import CheckpointError
from visuray.config import validate_config
from visuray.fusion.config import FusionModelConfig, FusionTrainConfig, TextEncoderConfig
from visuray.fusion.loop import build_objective, init_pretrained_parts
from visuray.fusion.model import build_fusion_model, load_fusion_model, save_fusion_model
from visuray.fusion.predict import FusionPredictor, QueryTextError, UnknownReferenceError
from visuray.fusion.tokenizer import TextTokenizer, train_tokenizer
from visuray.images import ImageDecodeError
from visuray.models.config import BackboneConfig, EmbeddingModelConfig
from visuray.models.embedding import build_embedding_model, save_model
from visuray.storage import StorageOptions

pytestmark = pytest.mark.unit

SHAPES = {"Tshirts": "rectangle", "Shoes": "ellipse", "Bags": "polygon"}
COLOURS = {"Red": (220, 30, 30), "Blue": (30, 30, 220), "Green": (30, 180, 30), "Black": (10, 10, 10)}
TINY_BACKBONE = tiny_vit(depth=1)
TINY_TEXT = {"width": 32, "depth": 1, "heads": 2, "max_length": 12, "dropout": 0.0}


def shape_jpeg(article_type: str, colour: str, size: int = 32) -> bytes:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    box = (6, 6, size - 6, size - 6)
    fill = COLOURS[colour]
    kind = SHAPES[article_type]
    if kind == "polygon":
        draw.polygon([(size // 2, 4), (size - 4, size - 4), (4, size - 4)], fill=fill)
    else:
        getattr(draw, kind)(box, fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shapes_catalog(uri: str) -> str:
    """24 items: 2 brands x 3 article types (shapes) x 4 colours; each (brand, type) is a product line."""
    records = []
    for brand in ("Acme", "Bolt"):
        for article_type in SHAPES:
            for colour in COLOURS:
                item_id = f"{brand}-{article_type}-{colour}".lower()
                records.append(
                    CatalogRecord(
                        item_id=item_id,
                        image=shape_jpeg(article_type, colour),
                        label=article_type,
                        category=article_type,
                        title=f"{brand} Men {colour} {article_type}",
                        attributes={"articleType": article_type, "baseColour": colour},
                        source=item_id,
                    )
                )
    write_catalog(records, uri)
    return uri


def tiny_fusion_cfg(fusion: str = "residual", vocab_size: int = 100) -> FusionModelConfig:
    return FusionModelConfig(
        backbone=BackboneConfig(**TINY_BACKBONE),
        text=TextEncoderConfig(**TINY_TEXT, vocab_size=vocab_size),
        fusion=fusion,
        fusion_depth=1,
        fusion_width=32,
        fusion_heads=2,
        fusion_dropout=0.0,
        embed_dim=16,
    )


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fusion-artifacts")
    catalog = write_shapes_catalog(str(root / "catalog"))
    tokenizer = TextTokenizer(
        train_tokenizer(["make it red", "in blue", "Acme Men Green Tshirts", "Bolt Black Bags"] * 2, 100, 1),
        12,
    )
    cfg = tiny_fusion_cfg(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_fusion_model(cfg)
    artifact = save_fusion_model(str(root / "model"), model, cfg, tokenizer)
    return {"model": artifact.root, "catalog": catalog, "root": str(root)}


def test_artifact_round_trip_gives_the_same_vectors(published: dict[str, str]) -> None:
    model, cfg, tokenizer, artifact = load_fusion_model(published["model"])
    assert artifact.manifest.kind == "fusion_model" and artifact.manifest.metadata["fusion"] == "residual"
    predictor = FusionPredictor.load(published["model"], reference_catalog=published["catalog"])
    image = shape_jpeg("Shoes", "Red")
    got = predictor.encode_query(image, "in blue")
    ids, padding = tokenizer(["in blue"])
    from visuray.images import decode_image, to_model_input

    with torch.no_grad():
        expected = model.encode_queries(to_model_input([decode_image(image)], 32), ids, padding)[0].numpy()
    assert got.vector.shape == (16,) and np.allclose(got.vector, expected, atol=1e-5)
    assert np.linalg.norm(got.vector) == pytest.approx(1.0, abs=1e-5)
    assert not (got.truncated or got.empty_text or got.no_known_tokens) and got.notes == []
    by_id = predictor.encode_query("acme-shoes-red", "in blue")
    assert np.allclose(by_id.vector, got.vector, atol=1e-5)
    gallery = predictor.encode_images([image, shape_jpeg("Bags", "Green")])
    assert gallery.shape == (2, 16) and np.allclose(np.linalg.norm(gallery, axis=1), 1, atol=1e-5)


def test_predictor_bad_input_is_a_documented_answer_or_a_clear_error(published: dict[str, str]) -> None:
    predictor = FusionPredictor.load(published["model"], reference_catalog=published["catalog"])
    image = shape_jpeg("Tshirts", "Black")
    for text in ("", "   ", None):
        empty = predictor.encode_query(image, text)
        assert empty.empty_text and np.isfinite(empty.vector).all() and "empty text" in empty.notes[0]
    long = predictor.encode_query(image, "make it red " * 200)
    assert long.truncated and long.text_tokens == 600 and "truncated" in " ".join(long.notes)
    unknown = predictor.encode_query(image, "ʕ•ᴥ•ʔ 日本語")
    assert unknown.no_known_tokens and np.allclose(unknown.vector, empty.vector, atol=1e-5)
    with pytest.raises(UnknownReferenceError, match="unknown reference id 'no-such-item'"):
        predictor.encode_query("no-such-item", "in red")
    with pytest.raises(ImageDecodeError):
        predictor.encode_query(b"not an image", "in red")
    with pytest.raises(ValueError, match="2 reference images but 1 texts"):
        predictor.encode_queries([image, image], ["in red"])
    bare = FusionPredictor.load(published["model"])
    with pytest.raises(UnknownReferenceError, match="no reference catalog"):
        bare.encode_query("acme-shoes-red", "in red")
    strict = FusionPredictor.load(published["model"], strict_text=True)
    with pytest.raises(QueryTextError, match="empty"):
        strict.encode_query(image, " ")
    with pytest.raises(QueryTextError, match="vocabulary"):
        strict.encode_query(image, "日本語")


def _train_cfg(catalog: str, **extra: object) -> FusionTrainConfig:
    data = {
        "catalog": catalog,
        "output": "/unused",
        "model": {
            "backbone": TINY_BACKBONE,
            "text": TINY_TEXT,
            "fusion_width": 32,
            "fusion_heads": 2,
            "embed_dim": 16,
        },
        **extra,
    }
    return validate_config(FusionTrainConfig, data)


def test_image_encoder_starts_from_an_embedding_model_artifact(published: dict[str, str]) -> None:
    emb_cfg = EmbeddingModelConfig(backbone=BackboneConfig(**TINY_BACKBONE), embedding_dim=8)
    torch.manual_seed(1)
    embedding = build_embedding_model(emb_cfg)
    artifact = save_model(str(Path(published["root"]) / "embedding"), embedding, emb_cfg)
    cfg = _train_cfg(published["catalog"], image_init_from=artifact.root)
    objective = build_objective(cfg)
    loaded = init_pretrained_parts(objective.model, cfg)
    assert loaded == [artifact.uri]
    for name, tensor in embedding.backbone.state_dict().items():
        assert torch.equal(objective.model.image_encoder.backbone.state_dict()[name], tensor), name
    wrong = _train_cfg(
        published["catalog"], image_init_from=artifact.root, model={"backbone": {**TINY_BACKBONE, "depth": 2}}
    )
    with pytest.raises(CheckpointError, match="does not fit"):
        init_pretrained_parts(build_objective(wrong).model, wrong)


def _check_text_init(model_uri: str, catalog: str, options: StorageOptions | None = None) -> None:
    source, _, tokenizer, _ = load_fusion_model(model_uri, options)
    cfg = _train_cfg(catalog, text_init_from=model_uri, storage=(options or StorageOptions()).model_dump())
    cfg.model.text.vocab_size = tokenizer.vocab_size
    objective = build_objective(cfg)
    init_pretrained_parts(objective.model, cfg)
    for name, tensor in source.text_encoder.state_dict().items():
        assert torch.equal(objective.model.text_encoder.state_dict()[name], tensor), name


def test_text_encoder_and_tokenizer_start_from_a_fusion_artifact(published: dict[str, str]) -> None:
    from visuray.fusion.data import build_fusion_data, load_items, prepare_tokenizer

    _check_text_init(published["model"], published["catalog"])
    cfg = _train_cfg(published["catalog"], text_init_from=published["model"], data={"test_fraction": 0.5})
    items, texts = load_items(cfg.catalog, cfg.data)
    tokenizer = prepare_tokenizer(cfg, texts, build_fusion_data(items, cfg.data))
    _, _, original, _ = load_fusion_model(published["model"])
    assert tokenizer.to_json() == original.to_json()


@pytest.mark.s3
def test_pretrained_text_encoder_and_tokenizer_file_from_s3(
    published: dict[str, str], s3_bucket: str
) -> None:
    model, cfg, tokenizer, _ = load_fusion_model(published["model"])
    options = StorageOptions()  # endpoint and keys from the fixture's AWS_* environment
    uri = f"{s3_bucket}/models/fusion"
    save_fusion_model(uri, model, cfg, tokenizer, options=options)
    _check_text_init(uri, published["catalog"], options)
    from visuray.storage import write_text

    write_text(f"{s3_bucket}/tok/tokenizer.json", tokenizer.to_json(), options)
    from_s3 = TextTokenizer.load(f"{s3_bucket}/tok/tokenizer.json", 12, options)
    assert from_s3.encode("make it red").ids == tokenizer.encode("make it red").ids


def test_a_catalog_without_type_or_colour_is_refused_before_training(tmp_path: Path) -> None:
    from visuray.fusion.job import run_train_fusion

    uri = str(tmp_path / "plain")
    write_catalog(
        [CatalogRecord(item_id=str(i), image=shape_jpeg("Bags", "Red"), label="x") for i in range(3)], uri
    )
    with pytest.raises(ValueError, match="no item with both 'articleType' and 'baseColour'"):
        run_train_fusion(_train_cfg(uri))
