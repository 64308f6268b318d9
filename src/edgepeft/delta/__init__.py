"""delta layer."""
