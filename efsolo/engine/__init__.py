"""Training: DenseCL-style pretraining, the FreeSOLO loop and its loss, self-training rounds, checkpoints and seeding, the health check."""
