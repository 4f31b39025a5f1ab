"""The numba backend for stacks of S > 1 stochastic layers (docs/math.md §11): a first, unfused version.

It is the NumPy reference's composition (kernels/numpy_.py: the same forward, the same backward, the
same Gaussian stage, likelihood and objective) with its most expensive stage, the MLP block (§2),
computed by the Numba building blocks of kernels/cpu.py: ``mm_nn`` / ``mm_nt`` / ``mm_tn`` (BLAS or
the custom GEMM of kernels/config.py), ``bias_act_`` (a = f(hW + b) in place) and ``act_back_colsum_``
(g <- g f'(h) and db = sum_rows g in one pass). Its oracle is ``NumpyBackend`` (tests/test_stack.py).

Not done here (what the fused one-layer backend has): the Gaussian stage, likelihood and objective in
@njit kernels, one fused pass over preallocated named workspaces, and the fused trainer. Every block's
activations are allocated per call.
"""
from __future__ import annotations

import numpy as np

from . import config
from .cpu import ACT_CODES, act_back_colsum_, bias_act_, mm_nn, mm_nt, mm_tn
from .numpy_ import NumpyBackend


class NumbaStackBackend(NumpyBackend):
    """NumpyBackend with the MLP blocks in Numba kernels; built through ``kernels.stack_class`` for
    backend 'numba' and S > 1."""
    name = "numba"

    def __init__(self, spec, dtype):
        super().__init__(spec, dtype)
        self.act = ACT_CODES[spec.activation]

    @staticmethod
    def _gemm():
        mb, nb = config.tiles()
        return config.gemm_code(), mb, nb

    def _block_forward(self, params, prefix, h):
        """h: (R, I) -> out: (R, O). Layer t: a = h W + b, then f in place (identity for the head).  §2.3

        Cache: the block's input and every layer's output (f(a), or the head's a)."""
        gemm, mb, nb = self._gemm()
        layers = self.layout.layer_views(params, prefix)
        h = np.ascontiguousarray(h, dtype=self.dtype)
        outs = [h]
        for t, (W, b) in enumerate(layers):
            a = np.empty((h.shape[0], W.shape[1]), dtype=self.dtype)          # (R, O_t)
            p1 = np.empty(W.size if gemm else 1, dtype=self.dtype)           # custom GEMM: W^T packed
            mm_nn(h, W, a, gemm, p1, mb, nb)
            bias_act_(a, b, self.act if t < len(layers) - 1 else 0)
            outs.append(a)
            h = a
        return outs[-1], (outs, [W for W, _ in layers])

    def _block_backward(self, dout, cache):
        """dout: (R, O) -> dh: (R, I) and [(dW, db), ...] for the hidden layers and the head.  §2.1, §2.3"""
        gemm, mb, nb = self._gemm()
        outs, Ws = cache
        g = np.array(dout, dtype=self.dtype, order="C")                      # modified in place
        grads = []
        for t in range(len(Ws) - 1, -1, -1):
            W = Ws[t]
            hin = outs[t]                                                    # (R, I_t)
            db = np.empty(W.shape[1], dtype=self.dtype)
            act_back_colsum_(g, outs[t + 1], db, self.act if t < len(Ws) - 1 else 0)
            dW = np.empty(W.shape, dtype=self.dtype)
            R = hin.shape[0]
            p1 = np.empty(hin.shape[1] * R if gemm else 1, dtype=self.dtype)
            p2 = np.empty(W.shape[1] * R if gemm else 1, dtype=self.dtype)
            mm_tn(hin, g, dW, gemm, p1, p2, mb, nb)                          # dW = h^T g
            dh = np.empty(hin.shape, dtype=self.dtype)
            mm_nt(g, np.ascontiguousarray(W), dh, gemm, mb, nb)              # dh = g W^T
            grads.append((dW, db))
            g = dh
        return g, grads[::-1]
