"""Nipype interfaces around antspyx and scanbridge models."""
