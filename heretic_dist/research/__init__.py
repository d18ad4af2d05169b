"""Research mode: residual geometry per layer, PaCMAP plots and animation, the per-layer direction sweep.

Modules: residuals (capture on the workers, safetensors storage), geometry (pure math), embedding
(PaCMAP as Ray tasks, Procrustes alignment, orientation rule), plots, sweep, run (the entry function).
"""
