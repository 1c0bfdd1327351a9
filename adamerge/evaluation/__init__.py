"""Labelled evaluation of merged vision towers under frozen zero-shot heads."""
