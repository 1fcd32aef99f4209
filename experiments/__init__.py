"""Experiments: the DC-ASGD paper's comparison on real data (see README.md)."""
