"""Data: image intake, subject/prior pairing, the LightningDataModule."""
from .datamodule import DreamBoothDataModule

__all__ = ["DreamBoothDataModule"]
