"""Figures of a run (matplotlib, Agg backend: no display needed)."""
