"""hostagent's benchmarks: connect() cost against a same-run baseline (see docs/benchmarks.md)."""
