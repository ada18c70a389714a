"""cutegrad: a compact PyTorch-style eager framework."""
