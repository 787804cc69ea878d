"""Bulk jobs on Ray Data: pipeline.py runs them, manifest.py records what happened to every input."""
