"""Fidelity evaluation: what POP costs in quality (see docs/modules.md)."""
