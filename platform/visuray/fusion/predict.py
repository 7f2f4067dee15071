"""Composed queries and gallery images to vectors with a published fusion model (for the ``fusion``
Serve deployment and offline jobs).

Bad input is answered, never crashed on (documented behaviour; each case is tested):

- empty or blank text (or ``None``): the query is the reference image composed with an empty text;
  the result's ``notes`` say so. With ``strict_text=True`` it is a :class:`QueryTextError` instead.
- text longer than the model's context: truncated to the context; ``truncated`` is True and a note
  gives the token counts.
- text with no token in the vocabulary: encoded as empty text (a row of [UNK] means nothing to the
  model); ``no_known_tokens`` is True and a note says so (:class:`QueryTextError` when strict).
- a reference given by id that is not in the reference catalog (or with no catalog loaded):
  :class:`UnknownReferenceError`, whose message names the id.
- image bytes that do not decode: :class:`visuray.images.ImageDecodeError`, as everywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from visuray.errors import VisurayError
from visuray.images import InputSpec, decode_image, to_model_input
from visuray.storage import StorageOptions

if TYPE_CHECKING:
    from PIL import Image

    from visuray.fusion.tokenizer import EncodedText

# A reference: encoded image bytes, a decoded PIL image, or the item id of a reference catalog row.
ImageInput = Union[bytes, "Image.Image", str]


class UnknownReferenceError(VisurayError, LookupError):
    """A reference item id that the predictor's reference catalog does not hold."""

    def __str__(self) -> str:  # LookupError would quote the message like a dict key
        return str(self.args[0]) if self.args else ""


class QueryTextError(VisurayError, ValueError):
    """Query text refused under ``strict_text`` (empty, or no known token)."""


@dataclass
class QueryEncoding:
    """A composed query's unit vector and what was done to its text."""

    vector: np.ndarray  # (D,) float32, unit norm
    text_tokens: int  # word pieces of the text before truncation
    truncated: bool
    empty_text: bool
    no_known_tokens: bool
    notes: list[str] = field(default_factory=list)


class FusionPredictor:
    """A loaded fusion model with its tokenizer; queries and images to vectors in one space."""

    def __init__(
        self,
        model: Any,
        model_cfg: Any,
        tokenizer: Any,
        version: str,
        references: Mapping[str, bytes] | None = None,
        strict_text: bool = False,
        device: str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.version = version
        self.references = dict(references or {})
        self.strict_text = strict_text
        self.device = device

    @classmethod
    def load(
        cls,
        uri: str,
        options: StorageOptions | None = None,
        *,
        reference_catalog: str | None = None,
        strict_text: bool = False,
        device: str = "cpu",
    ) -> FusionPredictor:
        """Load the fusion model artifact at ``uri`` (path or s3://, checksums verified).

        ``reference_catalog``: a catalog whose item ids may be given as references instead of images
        (its image bytes are held in memory).
        """
        from visuray.fusion.model import load_fusion_model

        model, cfg, tokenizer, artifact = load_fusion_model(uri, options)
        references = None
        if reference_catalog is not None:
            from visuray.catalog.readers import load_catalog_frame

            frame = load_catalog_frame(reference_catalog, options, columns=["item_id", "image"])
            references = dict(zip(frame["item_id"], frame["image"], strict=True))
        return cls(model, cfg, tokenizer, artifact.manifest.version, references, strict_text, device)

    @property
    def dim(self) -> int:
        return int(self.model_cfg.embed_dim)

    @property
    def input_spec(self) -> InputSpec:
        """The image encoder's input size and normalisation, as it was trained."""
        return self.model_cfg.backbone.input_spec

    def _image(self, image: ImageInput) -> Image.Image:
        if isinstance(image, str):
            if image not in self.references:
                where = "the reference catalog" if self.references else "no reference catalog (none loaded)"
                raise UnknownReferenceError(f"unknown reference id {image!r}: not in {where}")
            return decode_image(self.references[image])
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_image(bytes(image))
        return image.convert("RGB")

    def _check_text(self, encoded: EncodedText) -> None:
        if self.strict_text and encoded.empty:
            raise QueryTextError("the query text is empty")
        if self.strict_text and encoded.no_known_tokens:
            raise QueryTextError("no word of the query text is in the model's vocabulary")

    def encode_queries(
        self, images: Sequence[ImageInput], texts: Sequence[str | None]
    ) -> list[QueryEncoding]:
        """One :class:`QueryEncoding` per (reference, text); every input is checked before any runs."""
        import torch

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} reference images but {len(texts)} texts")
        if not images:
            return []
        pil = [self._image(image) for image in images]
        encoded = self.tokenizer.encode_batch(list(texts))
        for e in encoded:
            self._check_text(e)
        ids, padding = self.tokenizer.to_tensors(encoded)
        with torch.no_grad():
            x = to_model_input(pil, self.input_spec).to(self.device)
            vectors = self.model.encode_queries(x, ids.to(self.device), padding.to(self.device)).cpu().numpy()
        return [
            QueryEncoding(
                vector=v.astype(np.float32),
                text_tokens=e.num_tokens,
                truncated=e.truncated,
                empty_text=e.empty,
                no_known_tokens=e.no_known_tokens,
                notes=e.notes,
            )
            for v, e in zip(vectors, encoded, strict=True)
        ]

    def encode_query(self, image: ImageInput, text: str | None) -> QueryEncoding:
        """The composed query of one reference (bytes, PIL image or reference id) and one text."""
        return self.encode_queries([image], [text])[0]

    def encode_images(self, images: Sequence[ImageInput], batch_size: int = 64) -> np.ndarray:
        """(N, D) unit vectors of gallery/target images, comparable with query vectors by dot product."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                pil = [self._image(image) for image in images[start : start + batch_size]]
                x = to_model_input(pil, self.input_spec).to(self.device)
                out.append(self.model.encode_images(x).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), dtype=np.float32)
