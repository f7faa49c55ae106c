"""Weighted k-nearest-neighbour classification of image features, and the CIFAR-10 -> ViT input transform.

The k-NN protocol is DINO's (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021, `eval_knn.py` in facebookresearch/dino): L2-normalised features, cosine similarity to every
bank feature, the k = 20 most similar vote for their label with weight exp(similarity / T), T = 0.07,
and the class with the largest summed weight wins. It has no trainable part, so it measures the features
alone: a token-reduced backbone is good when its query features still land near the right bank features.

Pure tensor code: no models, no data loading. The bank is never the query set (no self-match removal).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DINO_K = 20
DINO_TEMPERATURE = 0.07
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def weighted_knn(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                 k: int = DINO_K, temperature: float = DINO_TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels `[Q]` of `queries [Q, D]` from `bank [N, D]` with labels `bank_labels [N]` (int64).

    Features are L2-normalised here; `k` is capped at N. Ties in the vote go to the lower class index
    (`argmax`), which only matters for exactly equal weights.
    """
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError(f"bank has {bank.shape[0]} features but {bank_labels.shape[0]} labels")
    if bank.shape[-1] != queries.shape[-1]:
        raise ValueError(f"feature sizes differ: bank {bank.shape[-1]}, queries {queries.shape[-1]}")
    k = min(k, bank.shape[0])
    bank = F.normalize(bank.float(), dim=-1)
    preds = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=-1)
        sim, idx = (q @ bank.T).topk(k, dim=-1)  # [q, k]
        weights = (sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[idx], weights)
        preds.append(votes.argmax(dim=-1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)


def resize_normalize(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """uint8 `[N, 3, h, w]` -> float `[N, 3, size, size]`: bicubic resize (clamped to [0, 1]), then
    ImageNet mean/std normalisation (what DINOv2 was trained with)."""
    x = images.float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std
