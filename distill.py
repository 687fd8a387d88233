"""distill.py: see README (work in progress)."""
