"""Writers of the real dataset formats (used by the collectors and by tests)."""
