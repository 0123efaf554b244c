"""The joint-diffusion core of redi-bench: network, objectives, samplers (see models/README.md)."""
