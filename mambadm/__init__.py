"""MambaDM: Mamba-based decision makers and Decision Transformer baselines for offline-RL scaling studies."""
__version__ = "0.1.0"
