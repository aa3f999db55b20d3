"""Evaluation of exported policies in real environments, in parallel with Ray."""
