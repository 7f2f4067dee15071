"""A small text transformer trained from scratch: token ids -> contextual tokens and a pooled vector.

Imports torch at module level: only training workers, the predictor and tests import this module (the
job's config lives in :mod:`visuray.fusion.model`, which stays torch-free).
"""

from __future__ import annotations

import torch
from torch import nn


def masked_mean(tokens: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the tokens that are not padding; (B, L, D) -> (B, D)."""
    if padding_mask is None:
        return tokens.mean(dim=1)
    keep = (~padding_mask).unsqueeze(-1).to(tokens.dtype)
    return (tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


def transformer_layers(width: int, heads: int, depth: int, dropout: float) -> nn.TransformerEncoder:
    """Pre-norm encoder layers (stable from random init without warm-up tricks), batch first."""
    layer = nn.TransformerEncoderLayer(
        d_model=width,
        nhead=heads,
        dim_feedforward=4 * width,
        dropout=dropout,
        activation="gelu",
        batch_first=True,
        norm_first=True,
    )
    # enable_nested_tensor only pays off on long padded batches at inference and warns with norm_first.
    return nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)


class TextTransformer(nn.Module):
    """Token + learned position embeddings, ``depth`` pre-norm layers, a final norm.

    ``forward(ids, padding_mask) -> (tokens (B, L, width), pooled (B, width))``; pooled is the mean of the
    non-padding tokens ([CLS] and [SEP] included, so empty text still has two tokens to pool).
    """

    def __init__(
        self, vocab_size: int, width: int, depth: int, heads: int, max_length: int, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.width = width
        self.max_length = max_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, width))
        nn.init.trunc_normal_(self.position_embedding, std=0.02)
        nn.init.trunc_normal_(self.token_embedding.weight, std=0.02)
        self.layers = transformer_layers(width, heads, depth, dropout)
        self.norm = nn.LayerNorm(width)

    def forward(
        self, ids: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        length = ids.shape[1]
        if length > self.max_length:
            raise ValueError(
                f"{length} tokens exceed the context of {self.max_length}; encode with truncation"
            )
        x = self.token_embedding(ids) + self.position_embedding[:, :length]
        x = self.norm(self.layers(x, src_key_padding_mask=padding_mask))
        return x, masked_mean(x, padding_mask)
