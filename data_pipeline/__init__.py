"""Readers for real offline-RL formats, the collector that writes them from real environments, and sharding."""
