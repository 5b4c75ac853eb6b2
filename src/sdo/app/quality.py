"""Sample-quality measures for spotting reward hacking: judge accuracy and a Frechet distance."""

from __future__ import annotations

import torch

__all__ = ["frechet_distance"]


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``[N, D]`` (Heusel et al. 2017, FID):

        d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^{1/2} S_b S_a^{1/2})^{1/2})

    computed in float64 with symmetric eigendecompositions (no SciPy needed).
    """
    a, b = features_a.double(), features_b.double()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)
