"""Datasets: one folder each with its prepare.py; tokenizers and the file format in common.py."""
