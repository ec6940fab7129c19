"""Experiment configs (ml_collections), loaded with --config=configs/<name>.py[:variant]."""
