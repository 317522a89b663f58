"""Elastic evaluation: quality at every k and per-layer budget, reports, suites, budget search."""
