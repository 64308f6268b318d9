"""Errors and JSON artifact helpers. Imports nothing else of edgepeft."""
