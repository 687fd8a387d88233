"""federated.py: see README (work in progress)."""
