"""filter.py: see README (work in progress)."""
