"""Subject-fidelity metrics of DreamBooth (Ruiz et al. 2023, arXiv 2208.12242, sec. 4.1) as torchmetrics Metrics.

Every metric keeps ``sum`` and ``count`` states reduced by summation, so batches of any size, in any order, on any
number of DDP processes give the same mean as one pass over everything. Images follow
:func:`dreambooth_pl.metrics.embedders.to_unit_float` (uint8 [0, 255] or float [0, 1]).
"""
from __future__ import annotations

import re
from typing import Literal, Optional, Sequence

import torch
from torchmetrics import Metric

from .embedders import CLIPEmbedder, DINOEmbedder, Images, _Embedder, load_clip, load_dino


def remove_identifier(prompt: str, token: str | None) -> str:
    """``prompt`` without the identifier ``token`` as a whole word: ``"a rraj person"`` -> ``"a person"``.

    The DreamBooth paper (sec. 4.1) defines CLIP-T as the cosine between prompt and image CLIP embeddings and does
    not say what happens to the identifier; DreamBench's prompts all carry it (``a {unique_token} {class_token} in
    the jungle``). Dropping it is our choice (:class:`CLIPTScore`'s ``prompt="without_identifier"``): CLIP never
    saw the rare token, so it adds tokenizer noise, not what the image should show.
    """
    if not token:
        return prompt
    return " ".join(re.sub(rf"(?<!\w){re.escape(token)}(?!\w)", " ", prompt).split())


class _SumCountMetric(Metric):
    """Mean of per-pair scores kept as a (sum, count) pair so it reduces exactly across batches and processes."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, scores: torch.Tensor) -> None:
        self.total += scores.double().sum().to(self.total.device)
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError(f"{type(self).__name__}.compute() before any update: no image pairs were scored.")
        return (self.total / self.count).float()


class ImageSimilarity(_SumCountMetric):
    """Mean pairwise cosine similarity between every scored image and every reference (real) image.

    Args:
        embedder: a frozen image embedder (see :mod:`.embedders`).
        reference: the subject's real images; embedded once (or later with :meth:`set_reference`).
    """

    def __init__(self, embedder: _Embedder, reference: Optional[Images] = None, **kwargs):
        super().__init__(**kwargs)
        self.embedder = embedder
        self.register_buffer("reference", None, persistent=False)  # a buffer, so .to(device) moves it
        if reference is not None:
            self.set_reference(reference)

    def set_reference(self, images: Images) -> None:
        """Embed the real images that every later update is compared with."""
        self.reference = self.embedder.embed_images(images)

    def update(self, images: Images, reference_index: Optional[torch.Tensor] = None) -> None:
        """Score ``images`` against all reference images.

        Args:
            images: generated images (or real ones, for the real-vs-real baseline).
            reference_index: per image, its own position in the reference set, or -1; that pair (an image with
                itself, similarity 1) is left out, which is how the paper's "real images" row is computed.
        """
        if self.reference is None:
            raise RuntimeError(f"{type(self).__name__}: call set_reference(real_images) before update().")
        sims = self.embedder.embed_images(images) @ self.reference.T  # both unit-norm: cosine similarity
        keep = torch.ones_like(sims, dtype=torch.bool)
        if reference_index is not None:
            idx = torch.as_tensor(reference_index, device=sims.device).long()
            if idx.shape != (sims.shape[0],):
                raise ValueError(f"reference_index needs one entry per image ({sims.shape[0]}), got {list(idx.shape)}")
            rows = torch.nonzero(idx >= 0).flatten()
            keep[rows, idx[rows]] = False
        self._add(sims[keep])


class DINOScore(ImageSimilarity):
    """DINO: mean pairwise cosine similarity of DINO ViT-S/16 embeddings, generated vs real (paper sec. 4.1).

    Used on class-prompt samples of the fine-tuned model it is PRES, the prior-preservation leakage score.

    Args:
        embedder: a :class:`DINOEmbedder` (None: :func:`load_dino` with ``weights``).
        reference: the subject's real images.
        weights: DINO weights when ``embedder`` is None (None: random, for tests).
    """

    def __init__(self, embedder: Optional[DINOEmbedder] = None, reference: Optional[Images] = None,
                 weights: Optional[str] = "dino", **kwargs):
        super().__init__(embedder or load_dino(weights), reference, **kwargs)


class CLIPIScore(ImageSimilarity):
    """CLIP-I: mean pairwise cosine similarity of CLIP ViT-B/32 image embeddings, generated vs real (sec. 4.1).

    Args:
        embedder: a :class:`CLIPEmbedder` (None: :func:`load_clip` with ``weights``).
        reference: the subject's real images.
        weights: CLIP weights when ``embedder`` is None (None: random, for tests).
    """

    def __init__(self, embedder: Optional[CLIPEmbedder] = None, reference: Optional[Images] = None,
                 weights: Optional[str] = "openai", **kwargs):
        super().__init__(embedder or load_clip(weights), reference, **kwargs)


class CLIPTScore(_SumCountMetric):
    """CLIP-T: mean cosine similarity between each generated image and its prompt's CLIP embedding (sec. 4.1).

    Args:
        embedder: a :class:`CLIPEmbedder` (None: :func:`load_clip` with ``weights``).
        token: the identifier token in the prompts (None: prompts are scored as given).
        weights: CLIP weights when ``embedder`` is None.
        prompt: ``without_identifier`` scores each prompt with ``token`` removed (:func:`remove_identifier`, which
            says why); ``as_generated`` scores the prompt the image was generated from, identifier included (the
            paper's text read literally).
    """

    def __init__(self, embedder: Optional[CLIPEmbedder] = None, token: Optional[str] = None,
                 weights: Optional[str] = "openai",
                 prompt: Literal["without_identifier", "as_generated"] = "without_identifier", **kwargs):
        super().__init__(**kwargs)
        if prompt not in ("without_identifier", "as_generated"):
            raise ValueError(f"CLIP-T prompt must be without_identifier or as_generated, got {prompt!r}")
        self.embedder = embedder or load_clip(weights)
        self.token = token if prompt == "without_identifier" else None

    def update(self, images: Images, prompts: Sequence[str]) -> None:
        """Score generated ``images`` (one per prompt, in order) against their ``prompts``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        image_emb = self.embedder.embed_images(images)
        if image_emb.shape[0] != len(prompts):
            raise ValueError(f"CLIP-T needs one prompt per image: got {image_emb.shape[0]} images, {len(prompts)} "
                             "prompts.")
        text_emb = self.embedder.embed_text([remove_identifier(p, self.token) for p in prompts])
        self._add((image_emb * text_emb).sum(-1))


class DINODiversity(_SumCountMetric):
    """DIV-DINO: 1 - mean pairwise DINO cosine among the samples of one prompt, averaged over prompts.

    The paper's DIV uses LPIPS (Zhang et al. 2018); LPIPS weights are not available offline, so this is the
    DINO-based stand-in, named so that it is not mistaken for the paper's number. Higher = more diverse.

    Args:
        embedder: a :class:`DINOEmbedder` (None: :func:`load_dino` with ``weights``).
        weights: DINO weights when ``embedder`` is None.
    """

    def __init__(self, embedder: Optional[DINOEmbedder] = None, weights: Optional[str] = "dino", **kwargs):
        super().__init__(**kwargs)
        self.embedder = embedder or load_dino(weights)

    def update(self, images: Images) -> None:
        """Add one prompt's samples (at least 2); their distinct pairs count once each."""
        emb = self.embedder.embed_images(images)
        n = emb.shape[0]
        if n < 2:
            raise ValueError(f"diversity needs at least 2 samples of a prompt, got {n}")
        sims = emb @ emb.T
        off_diagonal = sims[~torch.eye(n, dtype=torch.bool, device=sims.device)]
        self._add(torch.stack([off_diagonal.double().mean()]))

    def compute(self) -> torch.Tensor:
        return 1.0 - super().compute()
