"""Reproducible benchmark runs behind `rcm bench`."""
