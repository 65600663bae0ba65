"""Command-line tools: weights download/verify, the tiny model, offline generation."""
