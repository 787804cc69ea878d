"""Training on Ray Train: one generic per-worker loop (loop.py), the TorchTrainer factory (trainer.py)."""
