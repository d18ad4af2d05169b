"""Model side of heretic-dist. Nothing in this package imports Ray."""
