"""The Parquet catalog: one row per item (id, image bytes, labels, free text, attributes)."""
