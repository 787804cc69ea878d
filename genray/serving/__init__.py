"""Ray Serve app: one deployment per model artefact (batched), a multiplexed style pool, one FastAPI gateway."""
