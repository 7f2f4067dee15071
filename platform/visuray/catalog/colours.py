"""A colour attribute estimated from the pixels: the dominant colour of an item's photo, as a palette name.

The bundled clothing-small sample has class folders but no colour, and composed retrieval ("the same kind,
in red") needs one. :func:`estimate_colour` gives a deterministic estimate (same bytes, same name):

1. the image is resized to 64 x 64 (bilinear) and read as RGB in [0, 1];
2. the background is taken to be the colour of the border: pixels further than ``BACKGROUND_DISTANCE``
   (RGB, Euclidean) from the border's median colour are the item; when fewer than ``MIN_FOREGROUND`` of the
   pixels are, the photo's centre box (half its width and height) is used instead;
3. each item pixel is named by :func:`name_rgb` (HSV rules over the palette below) and votes with a
   Gaussian weight centred on the photo, because the garment is usually in the middle and the edges are
   floor, wall or hands;
4. the name with the largest weight wins (ties: palette order).

It is an estimate, not an annotation: patterned garments, shadows and coloured backgrounds mislead it, and
every report that uses it says so. It is computed once, where the bundled sample is made
(``python -m visuray.catalog.sample --metadata-only``, :mod:`visuray.catalog.sample`), and stored in the
sample's metadata CSVs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Names a shopper would type; order breaks ties and is the order reports list colours in.
PALETTE = ("black", "white", "grey", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")

ANALYSIS_SIDE = 64  # enough pixels for a vote, few enough to be instant on 300 photos
BORDER_FRACTION = 0.08  # outer frame taken as background: 5 px of 64
BACKGROUND_DISTANCE = 0.18  # RGB distance (0..sqrt(3)) beyond which a pixel differs from the border
MIN_FOREGROUND = 0.12  # below this share of item pixels the background guess failed: use the centre box
CENTRE_SIGMA = 0.35  # of the side: the centre's weight is ~7x the corners'


def name_hsv(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Palette indices for HSV arrays (hue in degrees [0, 360), saturation and value in [0, 1]).

    The thresholds are the usual hand rules for colour naming: dark is black whatever the hue, unsaturated
    is white or grey, then hue bands, with dark or dull oranges and yellows called brown (tan, khaki,
    camel) and light, unsaturated reds called pink.
    """
    idx = PALETTE.index
    out = np.full(h.shape, idx("grey"), dtype=np.int64)
    chromatic = (s >= 0.2) & (v >= 0.25)
    out[(v < 0.25)] = idx("black")
    # 0.65, not 0.8: phone photos of white garments are shaded grey-white, and a 0.8 cut called most grey.
    out[(v >= 0.25) & (s < 0.2) & (v >= 0.65)] = idx("white")
    red = chromatic & ((h < 15) | (h >= 340))
    out[red] = idx("red")
    out[red & (s < 0.5) & (v >= 0.7)] = idx("pink")
    warm = chromatic & (h >= 15) & (h < 45)
    out[warm] = idx("brown")
    out[warm & (s >= 0.5) & (v >= 0.7)] = idx("orange")
    yellowish = chromatic & (h >= 45) & (h < 70)
    out[yellowish] = idx("brown")
    out[yellowish & (v >= 0.5) & (s >= 0.35)] = idx("yellow")
    out[chromatic & (h >= 70) & (h < 170)] = idx("green")
    out[chromatic & (h >= 170) & (h < 260)] = idx("blue")
    out[chromatic & (h >= 260) & (h < 300)] = idx("purple")
    magenta = chromatic & (h >= 300) & (h < 340)
    out[magenta] = idx("pink")
    out[magenta & (v < 0.5)] = idx("purple")
    return out


def rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hue in degrees, saturation, value) of an (..., 3) RGB array in [0, 1]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    c = v - rgb.min(axis=-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    safe = np.maximum(c, 1e-12)
    h = np.where(v == r, ((g - b) / safe) % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = np.where(c > 0, h * 60.0, 0.0)
    return h, s, v


def name_rgb(rgb: Sequence[float] | np.ndarray) -> str:
    """The palette name of one RGB colour in [0, 1] (e.g. ``name_rgb((0.8, 0.1, 0.1)) == "red"``)."""
    h, s, v = rgb_to_hsv(np.asarray(rgb, dtype=np.float64).reshape(1, 3))
    return PALETTE[int(name_hsv(h, s, v)[0])]


def colour_votes(pixels: np.ndarray) -> dict[str, float]:
    """Weighted palette votes of the item pixels of an (S, S, 3) RGB image in [0, 1], normalised to sum 1."""
    side = pixels.shape[0]
    border = max(1, int(round(side * BORDER_FRACTION)))
    frame = np.ones(pixels.shape[:2], dtype=bool)
    frame[border:-border, border:-border] = False
    background = np.median(pixels[frame], axis=0)
    item = np.linalg.norm(pixels - background, axis=-1) > BACKGROUND_DISTANCE
    if item.mean() < MIN_FOREGROUND:
        item = np.zeros_like(item)
        item[side // 4 : side - side // 4, side // 4 : side - side // 4] = True
    yy, xx = np.mgrid[0:side, 0:side]
    centre = (side - 1) / 2
    weight = np.exp(-(((yy - centre) ** 2 + (xx - centre) ** 2) / (2 * (CENTRE_SIGMA * side) ** 2)))
    h, s, v = rgb_to_hsv(pixels[item])
    totals = np.bincount(name_hsv(h, s, v), weights=weight[item], minlength=len(PALETTE))
    totals = totals / max(totals.sum(), 1e-12)
    return {name: float(totals[i]) for i, name in enumerate(PALETTE)}


def estimate_colour(data: bytes) -> str:
    """The dominant colour name of an encoded image (deterministic; see the module docstring)."""
    from PIL import Image

    from visuray.images import decode_image

    img = decode_image(data).resize((ANALYSIS_SIDE, ANALYSIS_SIDE), Image.Resampling.BILINEAR)
    votes = colour_votes(np.asarray(img, dtype=np.float64) / 255.0)
    return max(PALETTE, key=lambda name: (votes[name], -PALETTE.index(name)))
