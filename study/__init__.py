"""The study tools: the comparison (compare.py), the synthetic bandits (bandits.py), probes and GPU diagnostics. Apart from the method."""
