"""The network and inference: backbone trunk, DenseCL import, SOLO, targets, losses, Matrix NMS, model files."""
