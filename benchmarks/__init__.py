"""Benchmarks: correctness first, then device-synchronised timing; CSV + markdown + PNG."""
