"""Routers: per-token choice and weighting of library adapters (filled in by the routers issue)."""
