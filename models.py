"""models.py: see README (work in progress)."""
