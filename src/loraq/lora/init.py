"""How an adapter starts.

* ``default``: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (Kaiming-uniform with
  ``a = sqrt(5)``, as PEFT and ``nn.Linear`` do), ``B = 0``: ``s B A = 0``, the
  adapted model starts equal to the base.
* ``gaussian``: ``A ~ N(0, (1/r)^2)``, ``B = 0`` (PEFT's "gaussian").
* ``pissa``: with ``W0 = U S V^T``, the top-r singular triplets move into the
  adapter and the base keeps the rest::

      s B A = U_r S_r V_r^T,   B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T,   W0 <- W0 - s B A

  so the output at initialisation is unchanged (up to the base's rounding).
  For a 4-bit base, PiSSA runs on the dequantized weight and the residual is
  quantized again with the same settings: the output then changes by the
  (small) difference between quantizing ``W0`` and quantizing the residual.
* ``loftq``: for a weight ``W`` that is about to be quantized, alternate
  ``Q_t = q(W - s B_{t-1} A_{t-1})`` and ``s B_t A_t = SVD_r(W - Q_t)``
  (``B_0 A_0 = 0``) for N iterations, so that ``Q + s B A`` approximates ``W``
  better than ``q(W)`` alone. ``q`` is loraq's own 4-bit quantizer; everything
  runs on whatever device holds ``W`` (a CPU is fine).

The functions here work on tensors; :mod:`loraq.lora.model` applies them to
layers.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch


def kaiming_uniform_a(r: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's default A: ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``, float32 ``[r, in]``."""
    a = torch.empty(r, in_features, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def gaussian_a(r: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's "gaussian" A: ``N(0, (1/r)^2)``, float32 ``[r, in]``."""
    return torch.randn(r, in_features, generator=generator, dtype=torch.float32) / r


def low_rank_factors(matrix: torch.Tensor, r: int, scale: float, exact: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scale * B @ A`` the best rank-r approximation of ``matrix`` (Eckart-Young).

    ``B = U_r sqrt(S_r / scale)``, ``A = sqrt(S_r / scale) V_r^T``: both factors
    carry half of the singular values, as PiSSA and LoftQ do. float32.
    ``exact=False`` finds the top-r triplets by a seeded randomized SVD
    (:func:`top_singular_triplets`): near-optimal, and much cheaper than a full
    SVD when r is small.
    """
    m = matrix.float()
    u, s, vh = torch.linalg.svd(m, full_matrices=False) if exact else top_singular_triplets(m, r)
    root = torch.sqrt(s[:r] / scale)
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    if a.shape[0] < r:  # a matrix of rank below r: pad with zero directions
        a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
    return a.contiguous(), b.contiguous()


def top_singular_triplets(matrix: torch.Tensor, k: int, oversample: int | None = None, power_iters: int = 2,
                          seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U_k, S_k, V_k^T)`` of ``matrix`` by a randomized range finder (Halko, Martinsson & Tropp 2011).

    ``Q`` = orthonormal basis of ``M @ Omega`` (``Omega`` Gaussian, ``k + oversample``
    columns, from a generator seeded with ``seed``: the result is reproducible),
    refined by ``power_iters`` rounds of ``Q <- orth(M orth(M^T Q))``; then the
    small SVD of ``Q^T M`` gives the triplets.
    """
    rows, cols = matrix.shape
    width = min(k + (oversample if oversample is not None else k), rows, cols)
    g = torch.Generator(device=matrix.device).manual_seed(seed)
    omega = torch.randn(cols, width, generator=g, device=matrix.device, dtype=matrix.dtype)
    q = torch.linalg.qr(matrix @ omega).Q
    for _ in range(power_iters):
        q = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ q).Q).Q
    u_small, s, vh = torch.linalg.svd(q.T @ matrix, full_matrices=False)
    return (q @ u_small)[:, :k], s[:k], vh[:k]


def pissa(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, residual)``: the principal rank-r part of ``weight`` as ``scale * B @ A``, and ``weight - scale * B @ A``."""
    w = weight.float()
    a, b = low_rank_factors(w, r, scale)
    return a, b, w - scale * (b @ a)


def loftq(
    weight: torch.Tensor,
    r: int,
    scale: float,
    iters: int,
    quantize: Callable[[torch.Tensor], tuple[Any, torch.Tensor]],
    exact_svd: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """LoftQ: ``(A, B, quantized)`` such that ``dequantize(quantized) + scale * B @ A ~ weight``.

    ``quantize(w)`` returns ``(quantized, dequantized float32)``; ``quantized``
    is whatever the caller's quantizer produces, handed back for the last
    iteration (the Q that the final A, B were fitted to). The rank-r SVD is
    randomized (seeded) unless ``exact_svd``: on SmolLM2's layers it reaches
    the same weight error as a full SVD at a fraction of the cost.
    """
    w = weight.float()
    to_quantize = w
    a = b = quantized = None
    for _ in range(iters):
        quantized, q = quantize(to_quantize)
        a, b = low_rank_factors(w - q, r, scale, exact=exact_svd)
        to_quantize = w - scale * (b @ a)
    return a, b, quantized


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F``."""
    exact = exact.float()
    return float(torch.linalg.matrix_norm(approx.float() - exact) / torch.linalg.matrix_norm(exact).clamp_min(1e-30))
