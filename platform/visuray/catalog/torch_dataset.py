"""A catalog as a ``torch.utils.data.Dataset`` (for DataLoader and samplers); apart from
:mod:`visuray.catalog.readers` so that reading a catalog does not import torch."""

from __future__ import annotations

from torch.utils.data import Dataset

from visuray.catalog.readers import CatalogRows


class CatalogTorchDataset(CatalogRows, Dataset):
    """:class:`~visuray.catalog.readers.CatalogRows` as a ``torch.utils.data.Dataset``."""
