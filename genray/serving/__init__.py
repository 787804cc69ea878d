"""Ray Serve app: model deployments with dynamic batching behind one FastAPI ingress."""
