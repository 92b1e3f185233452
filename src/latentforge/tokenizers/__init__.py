"""Image <-> latent tokenizers. Plain PyTorch: no Ray, no file I/O beyond weights."""
