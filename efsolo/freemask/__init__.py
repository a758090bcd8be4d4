"""Free Mask: unsupervised masks and embeddings from a self-supervised backbone (the freemask stage)."""
