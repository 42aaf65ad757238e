"""The main job: its configuration, recipe, run directory and command line."""
