"""Measurement: the timing engine, grid scheduling, workloads and step analysis of L(n)."""
