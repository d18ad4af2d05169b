"""Ray side of heretic-dist. Nothing in this package touches model internals."""
