"""Grids of runs through the main job, and their reports."""
