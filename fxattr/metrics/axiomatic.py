"""Axiomatic metrics (Quantus 0.6.0 names)."""

__all__: list[str] = []
