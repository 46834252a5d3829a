"""The evaluation harness: benchmarks, their runners and reports."""
