"""Chorus's test suite: `pytest` from the repository root (testpaths)."""
