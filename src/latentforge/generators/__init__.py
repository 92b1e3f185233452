"""Latent -> latent generators, transport and samplers. Plain PyTorch: no Ray."""
