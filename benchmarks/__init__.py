"""`make bench`: speed and memory figures for this machine (python -m benchmarks.bench); not part of the package."""
