"""Reproducible training commands of the shipped models (``scanbridge-train <model>``)."""
