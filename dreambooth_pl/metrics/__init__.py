"""DreamBooth evaluation metrics: frozen CLIP/DINO embedders and torchmetrics Metrics built on them."""
from .embedders import CLIPEmbedder, DINOEmbedder, EmbedderWeightsError, load_clip, load_dino, to_unit_float
from .subject import CLIPIScore, CLIPTScore, DINODiversity, DINOScore, ImageSimilarity, remove_identifier

__all__ = ["CLIPEmbedder", "DINOEmbedder", "EmbedderWeightsError", "load_clip", "load_dino", "to_unit_float",
           "CLIPIScore", "CLIPTScore", "DINODiversity", "DINOScore", "ImageSimilarity", "remove_identifier"]
