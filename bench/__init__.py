"""Benchmarks (make bench): ratios against a bare gRPC echo measured in the same run."""
