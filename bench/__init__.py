"""Benchmarks against PyTorch (see DESIGN.md, Benchmarks)."""
