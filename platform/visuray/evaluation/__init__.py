"""Evaluation: retrieval metrics computed in chunks (never an N x N matrix in memory)."""
