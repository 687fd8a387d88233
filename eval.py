"""eval.py: see README (work in progress)."""
