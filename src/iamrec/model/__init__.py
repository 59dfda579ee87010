"""Backbones: loading (hub id, local folder, tiny random config) and LoRA. Never imports Lightning."""
