"""Training jobs on Ray Train: one readable per-worker loop per task, configured by a StrictModel."""
