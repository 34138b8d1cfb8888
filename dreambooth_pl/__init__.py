"""dreambooth_pl: DreamBooth-LoRA for SDXL with prior preservation, on PyTorch Lightning."""
__version__ = "0.1.0"
