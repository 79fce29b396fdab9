"""Turnout: the composition root (settings -> store -> watcher -> edge + admin) and the CLI."""
