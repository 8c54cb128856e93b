"""verdant-trio load generator and benchmark (python -m bench). See "Benchmarks" in the README."""
