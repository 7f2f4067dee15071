"""Fusion modules: (image tokens, image embedding, text tokens) -> one query vector.

Every composer has the same call::

    composer(image_tokens (B, T, Ci), image_embedding (B, D), text_tokens (B, L, Ct),
             text_pooled (B, Ct), text_padding_mask (B, L) True at padding) -> (B, D)

``image_embedding`` is the reference image embedded exactly like a target image (the model's target
projection of the pooled features), so a query that ignores the text retrieves visually similar items.

- :class:`MAAF` (Modality-Agnostic Attention Fusion): image and text tokens, projected to one width,
  go through ``depth`` transformer layers together, without modality-specific weights; the output
  tokens are pooled per modality (mean of the image tokens and mean of the text tokens, averaged, as in
  the MAAF paper, so 17 image tokens (4 x 4 patches and [CLS]) do not drown a 6-token text), and the
  projected result is added to the image embedding (the paper's residual MAAF): the query starts where
  plain visual search is and the attention layers only have to learn the change the text asks for.
- :class:`ResidualAttentionFusion`: the image embedding plus ``weight x`` a residual read from the joint
  tokens by attention (the image embedding is the attention query), read from the image tokens and from
  the text tokens separately and summed, so the text always gets half of the read; ``weight`` is
  learnable and starts at a configurable value, so a pretrained image embedding is at first only nudged
  by the text.
- Baselines: :class:`ImageOnly`, :class:`TextOnly`, :class:`ConcatMLP`, :class:`GatedResidual` (TIRG).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from visuray.fusion.image_encoder import ImageEncoder
from visuray.fusion.text_encoder import TextTransformer, masked_mean, transformer_layers

FUSIONS = ("maaf", "residual", "image_only", "text_only", "concat", "tirg")


class JointTokens(nn.Module):
    """Image and text tokens projected to ``width`` and concatenated, with the joint padding mask."""

    def __init__(self, image_width: int, text_width: int, width: int) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.LayerNorm(image_width), nn.Linear(image_width, width))
        self.text = nn.Sequential(nn.LayerNorm(text_width), nn.Linear(text_width, width))

    def forward(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.cat([self.image(image_tokens), self.text(text_tokens)], dim=1)
        image_mask = torch.zeros(image_tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if text_padding_mask is None:
            text_padding_mask = torch.zeros(text_tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens, torch.cat([image_mask, text_padding_mask], dim=1)


def split_modalities(
    tokens: torch.Tensor, mask: torch.Tensor, n_image: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint tokens back into (image tokens, text tokens, text padding mask); image tokens come first."""
    return tokens[:, :n_image], tokens[:, n_image:], mask[:, n_image:]


def start_as_identity(layers: nn.TransformerEncoder) -> nn.TransformerEncoder:
    """Zero the output projections of each pre-norm layer's attention and MLP ("skip-init"), so that the
    stack starts as the identity and each layer grows in from there: stacked random-init layers otherwise
    scramble the projected tokens, and 2-4 fusion layers trained from scratch for a few hundred steps
    learned to ignore the text (fusion_quality.py: seed-0 R@10 0.41 / 0.34 at depth 2 / 4 before,
    0.48 / 0.47 after)."""
    for layer in layers.layers:
        for linear in (layer.self_attn.out_proj, layer.linear2):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
    return layers


def modality_pool(tokens: torch.Tensor, mask: torch.Tensor, n_image: int) -> torch.Tensor:
    """Mean of the image tokens and masked mean of the text tokens, averaged: each modality weighs half."""
    image, text, text_mask = split_modalities(tokens, mask, n_image)
    return 0.5 * (image.mean(dim=1) + masked_mean(text, text_mask))


class PreservationGate(nn.Module):
    """``2 sigmoid(W x + b) * image_embedding``, zero-initialised so that it starts as the identity.

    The additive residual of MAAF / residual fusion must cancel what the text replaces (the old colour)
    by subtraction; a per-dimension gate read from the fused tokens can also turn it down, as TIRG's gate
    and VAL's "preservation" branch do on the image features."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, embed_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, fused: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.proj(fused)) * image_embedding


class JointTokenFusion(nn.Module):
    """What MAAF and residual attention fusion share: project both modalities to ``width``, run them
    through ``depth`` joint transformer layers (starting as the identity), and normalise the result;
    with ``gate``, the image embedding they add their residual to goes through a
    :class:`PreservationGate` first."""

    min_depth = 0

    def __init__(
        self, image_width: int, text_width: int, width: int, depth: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        if depth < self.min_depth:
            raise ValueError(f"{type(self).__name__} needs fusion depth >= {self.min_depth}, got {depth}")
        self.depth = depth
        self.joint = JointTokens(image_width, text_width, width)
        # depth 0: the tokens are read as projected (no joint layers).
        self.layers = (
            start_as_identity(transformer_layers(width, heads, depth, dropout)) if depth > 0 else None
        )
        self.norm = nn.LayerNorm(width)
        self.gate: PreservationGate | None = None

    def preserved(self, fused: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        """The image embedding the residual is added to: gated by ``fused`` (B, width) when enabled."""
        return image_embedding if self.gate is None else self.gate(fused, image_embedding)

    def fused_tokens(
        self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised joint tokens (B, T + L, width), joint padding mask); image tokens first."""
        tokens, mask = self.joint(image_tokens, text_tokens, text_padding_mask)
        if self.layers is not None:
            tokens = self.layers(tokens, src_key_padding_mask=mask)
        return self.norm(tokens), mask


class MAAF(JointTokenFusion):
    # Without layers nothing would mix the modalities.
    min_depth = 1

    def __init__(
        self,
        image_width: int,
        text_width: int,
        width: int,
        embed_dim: int,
        depth: int,
        heads: int,
        dropout: float,
        gate: bool = False,
    ) -> None:
        super().__init__(image_width, text_width, width, depth, heads, dropout)
        self.out = nn.Linear(width, embed_dim)
        if gate:  # created last: without it, the other weights draw the same random numbers as before
            self.gate = PreservationGate(width, embed_dim)

    def forward(self, image_tokens, image_embedding, text_tokens, text_pooled, text_padding_mask):  # noqa: ANN001, ANN201
        fused, mask = self.fused_tokens(image_tokens, text_tokens, text_padding_mask)
        pooled = modality_pool(fused, mask, image_tokens.shape[1])
        return self.preserved(pooled, image_embedding) + self.out(pooled)


class ResidualAttentionFusion(JointTokenFusion):
    def __init__(
        self,
        image_width: int,
        text_width: int,
        width: int,
        embed_dim: int,
        depth: int,
        heads: int,
        dropout: float,
        residual_init_weight: float,
        gate: bool = False,
    ) -> None:
        super().__init__(image_width, text_width, width, depth, heads, dropout)
        self.query = nn.Linear(embed_dim, width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.out = nn.Linear(width, embed_dim)
        self.weight = nn.Parameter(torch.tensor(float(residual_init_weight)))
        if gate:  # created last, as in MAAF
            self.gate = PreservationGate(width, embed_dim)

    def forward(self, image_tokens, image_embedding, text_tokens, text_pooled, text_padding_mask):  # noqa: ANN001, ANN201
        tokens, mask = self.fused_tokens(image_tokens, text_tokens, text_padding_mask)
        query = self.query(image_embedding).unsqueeze(1)
        image, text, text_mask = split_modalities(tokens, mask, image_tokens.shape[1])
        from_image, _ = self.attention(query, image, image, need_weights=False)
        from_text, _ = self.attention(query, text, text, key_padding_mask=text_mask, need_weights=False)
        read = (from_image + from_text).squeeze(1)
        return self.preserved(read, image_embedding) + self.weight * self.out(read)


class ImageOnly(nn.Module):
    """The reference image's own embedding: what plain visual search returns, text ignored."""

    depth = 0

    def forward(self, image_tokens, image_embedding, text_tokens, text_pooled, text_padding_mask):  # noqa: ANN001, ANN201
        return image_embedding


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class TextOnly(nn.Module):
    """The text alone, projected into the target space: "in red" without knowing what."""

    depth = 0

    def __init__(self, text_width: int, embed_dim: int) -> None:
        super().__init__()
        self.out = _mlp(text_width, 2 * embed_dim, embed_dim)

    def forward(self, image_tokens, image_embedding, text_tokens, text_pooled, text_padding_mask):  # noqa: ANN001, ANN201
        return self.out(text_pooled)


class ConcatMLP(nn.Module):
    """Late fusion: an MLP over the concatenated image embedding and pooled text."""

    depth = 0

    def __init__(self, text_width: int, embed_dim: int) -> None:
        super().__init__()
        self.out = _mlp(embed_dim + text_width, 2 * embed_dim, embed_dim)

    def forward(self, image_tokens, image_embedding, text_tokens, text_pooled, text_padding_mask):  # noqa: ANN001, ANN201
        return self.out(torch.cat([image_embedding, text_pooled], dim=-1))


class GatedResidual(nn.Module):
    """TIRG (Vo et al. 2019): ``w_g * sigmoid(gate(x)) * image + w_r * residual(x)``, x = [image; text].

    The gate keeps the parts of the image the text does not touch; the residual adds what it changes.
    ``w_g, w_r`` start at 1 and 0.1 so that, at first, the query is close to the reference image.
    """

    depth = 0

    def __init__(self, text_width: int, embed_dim: int) -> None:
        super().__init__()
        joint = embed_dim + text_width
        self.gate = nn.Sequential(nn.BatchNorm1d(joint), nn.ReLU(), _mlp(joint, 2 * embed_dim, embed_dim))
        self.residual = nn.Sequential(nn.BatchNorm1d(joint), nn.ReLU(), _mlp(joint, 2 * embed_dim, embed_dim))
        self.weights = nn.Parameter(torch.tensor([1.0, 0.1]))

    def forward(self, image_tokens, image_embedding, text_tokens, text_pooled, text_padding_mask):  # noqa: ANN001, ANN201
        x = torch.cat([image_embedding, text_pooled], dim=-1)
        gated = torch.sigmoid(self.gate(x)) * image_embedding
        return self.weights[0] * gated + self.weights[1] * self.residual(x)


def build_composer(
    fusion: str,
    image_width: int,
    text_width: int,
    width: int,
    embed_dim: int,
    depth: int,
    heads: int,
    dropout: float,
    residual_init_weight: float,
    gate: bool = False,
) -> nn.Module:
    """The fusion module named ``fusion`` (one of :data:`FUSIONS`); depth and ``gate`` (a
    :class:`PreservationGate`) apply to maaf and residual."""
    if fusion == "maaf":
        return MAAF(image_width, text_width, width, embed_dim, depth, heads, dropout, gate)
    if fusion == "residual":
        return ResidualAttentionFusion(
            image_width, text_width, width, embed_dim, depth, heads, dropout, residual_init_weight, gate
        )
    if fusion == "image_only":
        return ImageOnly()
    if fusion == "text_only":
        return TextOnly(text_width, embed_dim)
    if fusion == "concat":
        return ConcatMLP(text_width, embed_dim)
    if fusion == "tirg":
        return GatedResidual(text_width, embed_dim)
    raise ValueError(f"unknown fusion {fusion!r}; choose one of {', '.join(FUSIONS)}")


class FusionModel(nn.Module):
    """Image encoder + text encoder + composer; queries and targets land in one unit-sphere space.

    ``encode_images(images)`` embeds gallery/target images; ``encode_queries(images, ids, padding_mask)``
    embeds composed queries; ``forward(reference, ids, padding_mask, target)`` does both for training,
    with one image-encoder pass over reference and target images together.
    """

    def __init__(
        self, image_encoder: ImageEncoder, text_encoder: TextTransformer, composer: nn.Module, embed_dim: int
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.composer = composer
        self.embed_dim = embed_dim
        self.target_projection = nn.Linear(image_encoder.width, embed_dim)

    def _compose(
        self,
        image_tokens: torch.Tensor,
        image_pooled: torch.Tensor,
        ids: torch.Tensor,
        padding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        text_tokens, text_pooled = self.text_encoder(ids, padding_mask)
        image_embedding = self.target_projection(image_pooled)
        query = self.composer(image_tokens, image_embedding, text_tokens, text_pooled, padding_mask)
        return F.normalize(query, dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        _, pooled = self.image_encoder(images)
        return F.normalize(self.target_projection(pooled), dim=-1)

    def encode_queries(
        self, images: torch.Tensor, ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        tokens, pooled = self.image_encoder(images)
        return self._compose(tokens, pooled, ids, padding_mask)

    def forward(
        self,
        reference: torch.Tensor,
        ids: torch.Tensor,
        padding_mask: torch.Tensor | None,
        target: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = reference.shape[0]
        tokens, pooled = self.image_encoder(torch.cat([reference, target]))
        query = self._compose(tokens[:n], pooled[:n], ids, padding_mask)
        return query, F.normalize(self.target_projection(pooled[n:]), dim=-1)
