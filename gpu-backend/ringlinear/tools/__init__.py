"""Command-line tools: tiny checkpoints, golden vectors, parameter counts."""
