"""verdant-trio load generator and benchmark (python -m bench). See docs/benchmarks.md."""
