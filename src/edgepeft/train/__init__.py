"""Explicit training loops: pretraining the base, adapting a delta per asset."""
