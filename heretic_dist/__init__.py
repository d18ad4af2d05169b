"""heretic-dist: distributed directional ablation ("abliteration") with a two-objective search on Ray."""

__version__ = "0.1.0"
