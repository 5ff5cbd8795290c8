"""Experiments: one script each, run from the repository root; what they share is in common.py."""
