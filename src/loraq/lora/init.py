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
* ``calibrated``: LoftQ's goal measured where it matters, on the layer's
  output for real inputs. With ``H = sum_x x x^T`` over calibration
  activations ``x`` (the layer's inputs in the full-precision model) and
  ``E = W - Q``, ``Q = q(W)``, choose ``s B A`` of rank r to minimise::

      sum_x ||(E - s B A) x||^2 + lam ||E - s B A||_F^2  =  ||(E - s B A) L||_F^2,   L L^T = H + lam I

  (``lam = damp * mean(diag H)``: a little weight-space error in the
  objective, so directions the calibration data never excites stay
  determined, as GPTQ damps its Hessian). With ``M = s B A`` and ``N = M L``
  this is the rank-r approximation of ``E L`` (Eckart-Young): ``N = U_r S_r
  V_r^T = SVD_r(E L)``, ``M = N L^{-1}``, so::

      B = U_r sqrt(S_r / s) c,    A = c^{-1} sqrt(S_r / s) V_r^T L^{-1}

  with ``c`` the per-direction balance that gives each column of B the norm
  of the matching row of A (the product is unchanged; neither factor starts
  much larger than the other, which keeps the optimizer's relative step
  alike on both). With ``iters > 1``, alternate as LoftQ does:
  ``Q_t = q(W - s B_{t-1} A_{t-1})`` and refit. ``H = I`` (``lam -> inf``)
  gives LoftQ's weight-space fit back.

  The fitted pair does not train: it stays frozen beside the adapter
  (``LoraLinear.lora_correction``), whose own A and B start as ``default``
  does, so the layer computes ``Q + s B0 A0 + s B A`` with ``B = 0`` at the
  start. Trained through, the fit lost its head start in forgetting
  (``bench/NOTES.md``, issue 17); frozen, training starts from the corrected
  base as LoRA starts from the full-precision one, and the adapter folder is
  an ordinary rank-r adapter of the full-precision weights (``Q + s B0 A0 ~
  W``), with ``B0, A0`` stored beside it for the 4-bit base.

The functions here work on tensors; :mod:`loraq.lora.model` applies them to
layers.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def kaiming_uniform_a(r: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's default A: ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``, float32 ``[r, in]``."""
    a = torch.empty(r, in_features, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


def gaussian_a(r: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """PEFT's "gaussian" A: ``N(0, (1/r)^2)``, float32 ``[r, in]``."""
    return torch.randn(r, in_features, generator=generator, dtype=torch.float32) / r


def low_rank_factors(matrix: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scale * B @ A`` the best rank-r approximation of ``matrix`` (Eckart-Young).

    ``B = U_r sqrt(S_r / scale)``, ``A = sqrt(S_r / scale) V_r^T``: both factors
    carry half of the singular values, as PiSSA and LoftQ do. float32.
    """
    u, s, vh = top_singular_triplets(matrix, r)
    root = torch.sqrt(s / scale)
    b = (u * root).float()
    a = (root[:, None] * vh).float()
    if a.shape[0] < r:  # r above the matrix's smaller side: pad with zero directions
        a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
    return a.contiguous(), b.contiguous()


def top_singular_triplets(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact top-r ``(U_r, S_r, V_r^T)`` of ``matrix``, float64.

    Through the eigen-decomposition of the Gram matrix on the smaller side,
    ``M^T M = V S^2 V^T`` (then ``U = M V / S``), in float64: as exact as a
    full SVD for the leading triplets, and several times faster on a CPU
    (LoftQ runs one per layer and iteration). Not a randomized SVD: that
    reached the same Frobenius error on SmolLM2's layers, yet LoftQ with it
    recovered only 19% of the NF4 perplexity gap instead of 29% (docs/loftq.md).
    """
    m = matrix.detach().double()
    wide = m.shape[0] < m.shape[1]
    if wide:
        m = m.T
    eigenvalues, eigenvectors = torch.linalg.eigh(m.T @ m)  # ascending
    k = min(r, m.shape[1])
    s = eigenvalues[-k:].flip(0).clamp_min(0).sqrt()
    v = eigenvectors[:, -k:].flip(1)
    u = (m @ v) / torch.where(s > 0, s, torch.ones_like(s))
    u = torch.where(s > 0, u, torch.zeros_like(u))
    return (v, s, u.T) if wide else (u, s, v.T)


def pissa(weight: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, residual)``: the principal rank-r part of ``weight`` as ``scale * B @ A``,
    and ``weight - scale * B @ A``."""
    w = weight.float()
    a, b = low_rank_factors(w, r, scale)
    return a, b, w - scale * (b @ a)


def loftq(
    weight: torch.Tensor,
    r: int,
    scale: float,
    iters: int,
    quantize: Callable[[torch.Tensor], tuple[Any, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """LoftQ: ``(A, B, quantized)`` such that ``dequantize(quantized) + scale * B @ A ~ weight``.

    ``quantize(w)`` returns ``(quantized, dequantized float32)``; ``quantized``
    is whatever the caller's quantizer produces, handed back for the last
    iteration (the Q that the final A, B were fitted to).
    """
    w = weight.float()
    to_quantize = w
    a = b = quantized = None
    for _ in range(iters):
        quantized, q = quantize(to_quantize)
        a, b = low_rank_factors(w - q, r, scale)
        to_quantize = w - scale * (b @ a)
    return a, b, quantized


def whitened_low_rank_factors(residual: torch.Tensor, second_moment: torch.Tensor, r: int, scale: float,
                              damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scale * B @ A`` the rank-r ``M`` minimising ``||(residual - M) L||_F``, ``L L^T = H + lam I``.

    ``second_moment`` is ``H = sum x x^T`` (``[in, in]``); ``lam = damp *
    mean(diag H)``. Computed in float64 (Cholesky, exact top-r SVD of
    ``residual @ L``, triangular solve), returned balanced (see the module
    docstring) as float32.
    """
    h = second_moment.detach().double()
    lam = damp * h.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    chol = torch.linalg.cholesky(h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
    u, s, vh = top_singular_triplets(residual.detach().double() @ chol, r)
    a = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)  # V_r^T L^{-1}
    root = torch.sqrt(s / scale)
    b = u * root
    a = root[:, None] * a
    # c_i = sqrt(|a_i| / |b_i|), so that |b_i c_i| = |a_i / c_i|
    balance = torch.sqrt(a.norm(dim=1) / b.norm(dim=0).clamp_min(torch.finfo(torch.float64).tiny))
    balance = torch.where(s > 0, balance, torch.ones_like(balance))
    b, a = b * balance, a / balance[:, None]
    if a.shape[0] < r:  # r above the matrix's smaller side: pad with zero directions
        a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
    return a.float().contiguous(), b.float().contiguous()


def calibrated(
    weight: torch.Tensor,
    second_moment: torch.Tensor,
    r: int,
    scale: float,
    iters: int,
    quantize: Callable[[torch.Tensor], tuple[Any, torch.Tensor]],
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The calibrated initialisation: ``(A, B, quantized)`` with ``dequantize(quantized) + scale * B @ A`` close
    to ``weight`` on the inputs whose second moment is ``second_moment`` (module docstring).

    ``quantize`` as for :func:`loftq`. With ``iters == 1`` the base is exactly ``q(weight)``.
    """
    w = weight.float()
    to_quantize = w
    a = b = quantized = None
    for _ in range(iters):
        quantized, q = quantize(to_quantize)
        a, b = whitened_low_rank_factors(w - q, second_moment, r, scale, damp)
        to_quantize = w - scale * (b @ a)
    return a, b, quantized
