"""Evaluation: metrics, reports and image grids for the built-in tasks."""
