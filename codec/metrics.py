"""Reconstruction error of a lossy round trip."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ReconError:
    """How far a reconstruction is from its reference: cosine similarity, relative L2, max |diff|."""

    cosine: float
    rel_l2: float
    max_abs: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def reconstruction_error(reference: torch.Tensor, approx: torch.Tensor) -> ReconError:
    """Compare two tensors of the same shape (computed in float64 on the reference's device)."""
    if reference.shape != approx.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(approx.shape)}")
    ref = reference.detach().reshape(-1).double()
    app = approx.detach().to(ref.device).reshape(-1).double()
    diff = app - ref
    ref_norm = torch.linalg.vector_norm(ref)
    app_norm = torch.linalg.vector_norm(app)
    denom = ref_norm * app_norm
    cosine = float(torch.dot(ref, app) / denom) if denom > 0 else float(torch.equal(ref, app))
    cosine = max(-1.0, min(1.0, cosine))  # rounding can land a hair outside [-1, 1]
    rel_l2 = float(torch.linalg.vector_norm(diff) / ref_norm) if ref_norm > 0 else float(torch.linalg.vector_norm(diff))
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    return ReconError(cosine=cosine, rel_l2=rel_l2, max_abs=max_abs)
