"""Benchmarks of lsx against the frameworks' built-ins (outside the package; see run.py)."""
