"""Callbacks: they observe training (export, sample grids, subject metrics) and never change weights."""
from .export import LoRAExport

__all__ = ["LoRAExport"]
