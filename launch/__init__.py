"""Entry points: the `softprune` CLI and the training recipes."""
