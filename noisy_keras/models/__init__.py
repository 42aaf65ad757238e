"""The model zoo, its layers (Ghost Batch Normalization) and losses."""
