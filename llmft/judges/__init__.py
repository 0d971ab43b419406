"""Judges: programs that score responses exactly (no model can argue with them)."""
