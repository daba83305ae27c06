"""The relay's benchmark: a load generator, a driver and a report (see docs/benchmarks.md)."""
