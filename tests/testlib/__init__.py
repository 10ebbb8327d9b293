"""Shared helpers for xtnd's tests (real storage, processes, waiting)."""
