"""Pretrained priors shipped as package data (safetensors + JSON metadata)."""
