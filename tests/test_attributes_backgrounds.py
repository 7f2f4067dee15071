"""Background compositing as a training augmentation: alpha masks aligned with the decoded pixels, the
blend per step, and the in-process loop applying it before the flips and shifts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import tiny_vit
from visuray.attributes.backgrounds import (
    BackgroundBank,
    BackgroundCompositing,
    background_crops,
    foreground_alphas,
)
from visuray.attributes.config import AttributeModelConfig, LossSection
from visuray.attributes.data import batch_indices, decode_to_uint8
from visuray.attributes.fit import fit_in_process
from visuray.attributes.model import build_attribute_model
from visuray.images import InputSpec, encode_jpeg

pytestmark = pytest.mark.unit


def studio_photo(colour: tuple[int, int, int]) -> bytes:
    """A 48 x 64 white-background photo with a coloured product in the middle."""
    pixels = np.full((64, 48, 3), 255, dtype=np.uint8)
    pixels[16:48, 12:36] = colour
    return encode_jpeg(Image.fromarray(pixels))


def test_alphas_line_up_with_the_decoded_pixels() -> None:
    photos = [studio_photo((200, 30, 30)), studio_photo((30, 30, 200))]
    alphas = foreground_alphas(photos, 32)
    pixels = decode_to_uint8(photos, 32)
    assert alphas.shape == (2, 1, 32, 32) and alphas.dtype == torch.uint8
    product = alphas[:, 0] == 255
    backdrop = alphas[:, 0] == 0
    assert product.sum() > 100 and backdrop.sum() > 100
    # Where the alpha says product, the decoded pixel is the product's colour; where it says backdrop, white.
    assert (pixels[0, 0][product[0]].float().mean() > 150) and (pixels[0, 2][product[0]].float().mean() < 90)
    assert pixels[:, :, backdrop[0]].float().min() > 230


def test_compositing_pastes_products_over_backgrounds_as_a_function_of_the_step() -> None:
    alphas = torch.zeros(3, 1, 8, 8, dtype=torch.uint8)
    alphas[:, :, 2:6, 2:6] = 255
    backgrounds = torch.stack([torch.full((3, 8, 8), v, dtype=torch.uint8) for v in (10, 20, 30, 40)])
    batch = torch.full((3, 3, 8, 8), 200, dtype=torch.uint8)

    always = BackgroundCompositing(alphas, backgrounds, probability=1.0, seed=3)
    out = always(batch, [0, 1, 2], step=5)
    assert (out[:, :, 2:6, 2:6] == 200).all()  # the product stays
    outside = out[:, :, 0, 0]
    assert set(outside.flatten().tolist()) <= {10, 20, 30, 40}  # the backdrop is a background crop
    assert torch.equal(out, always(batch, [0, 1, 2], step=5))  # same step, same composites
    steps = {tuple(always(batch, [0, 1, 2], step=s)[:, 0, 0, 0].tolist()) for s in range(20)}
    assert len(steps) > 1  # other steps draw other crops

    never = BackgroundCompositing(alphas, backgrounds, probability=0.0)
    assert torch.equal(never(batch, [0, 1, 2], step=0), batch)
    half = BackgroundCompositing(alphas, backgrounds, probability=0.5)
    pasted = [bool((half(batch[:1], [0], step=s)[0, :, 0, 0] != 200).any()) for s in range(200)]
    assert 60 < sum(pasted) < 140

    with pytest.raises(ValueError, match="probability"):
        BackgroundCompositing(alphas, backgrounds, probability=1.5)
    crops = background_crops(BackgroundBank(), 4, 8, seed=0)
    assert crops.shape == (4, 3, 8, 8) and crops.dtype == torch.uint8


def test_the_in_process_loop_composites_each_batch_before_its_flips_and_shifts() -> None:
    cfg = AttributeModelConfig.model_validate(
        {"backbone": tiny_vit(), "embed_dim": 16, "groups": [{"name": "g", "labels": ["g=a", "g=b"]}]}
    )
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    targets = (torch.rand(10, 2) < 0.5).float().numpy()
    known = np.ones_like(targets, dtype=bool)
    spec = InputSpec(32)

    def fit(composite: object = None) -> list[float]:
        torch.manual_seed(0)
        model = build_attribute_model(cfg)
        return fit_in_process(
            model, images, spec, targets, known, LossSection(), steps=3, batch_size=4, lr=1e-3,
            composite=composite,
        )  # fmt: skip

    seen: list[tuple[list[int], int]] = []

    def identity(batch: torch.Tensor, rows: list[int], step: int) -> torch.Tensor:
        seen.append((list(rows), step))
        return batch

    plain = fit()
    assert fit(identity) == plain  # an edit that changes nothing changes nothing, flips included
    assert seen == [(batch_indices(10, 4, 0, step), step) for step in range(3)]
    blanked = fit(lambda batch, rows, step: torch.zeros_like(batch))
    assert blanked != plain  # the edited pixels are what the model trains on
