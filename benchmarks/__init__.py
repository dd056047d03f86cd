"""Benchmarks: scripts, not tests. `make bench` runs them; each prints a ratio against a baseline
measured in the same run and exits non-zero when a target is missed."""
