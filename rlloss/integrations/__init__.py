"""Integrations with trainers and model libraries (transformers, TRL, verl)."""
