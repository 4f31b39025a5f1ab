"""The Numba CPU backend of the deterministic Autoencoder (docs/math.md §13, §9).

It computes exactly the function of :class:`minivae.kernels.numpy_ae.AENumpyBackend` by composing the
VAE's @njit blocks of kernels/cpu.py (``mlp_fwd_`` / ``mlp_bwd_``: GEMM, ``bias_act_``,
``act_back_colsum_``) over one preallocated workspace per batch size; the only new kernels are the
fused sigmoid + squared error + its gradient, written over the decoder head in place, and the
sigmoid of ``decode``.
tests/test_autoencoder.py checks it against the NumPy reference.

Shape legend: n examples, D = x_dim, Z = z_dim, nl layers (ne = len(hidden): layer ne is enc.head).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
from numba import njit

from .numba_cache import configure as _configure_cache
from .cpu import (ACT_CODES, BufferTable, NumbaBackend, cached_workspace, exp_nonpos, gemm_settings, layer_entries,
                  layer_table, mlp_bwd_, mlp_fwd_, pack_entry)

_configure_cache()      # before the first @njit(cache=True): one cache per source version (numba_cache.py)


@njit(cache=True, error_model="numpy")
def sigmoid_(a):
    """a <- sigmoid(a) in place, e^{-|a|} only (no overflow).   a: (N, D).   §13.1"""
    N, D = a.shape
    one = a.dtype.type(1)
    for r in range(N):
        for c in range(D):
            v = a[r, c]
            e = exp_nonpos(-abs(v))
            a[r, c] = one / (one + e) if v >= 0 else e / (one + e)


@njit(cache=True, error_model="numpy")
def sq_error_sigmoid_(head, x, err, scale, want_grad):
    """err_i = sum_d (sigmoid(a_id) - x_id)^2 (float64), and with ``want_grad`` the head overwritten
    by dlogits = scale * 2 (x_hat - x) x_hat (1 - x_hat).   head, x: (n, D)  err: (n,).   §13.2"""
    n, D = head.shape
    dt = head.dtype.type
    one = dt(1)
    two_scale = dt(2 * scale)
    for r in range(n):
        s = 0.0
        for c in range(D):
            v = head[r, c]
            e = exp_nonpos(-abs(v))
            xh = one / (one + e) if v >= 0 else e / (one + e)
            d = xh - x[r, c]
            s += d * d
            if want_grad:
                head[r, c] = two_scale * d * xh * (one - xh)
        err[r] = s


class AEWorkspace(BufferTable):
    """Every buffer of an n-row pass in one flat array of the model dtype, named as in kernels/cpu.Workspace
    (the layers' outputs and gradients, ``pack``) with L = 1 and no posterior; ``err``: the per-example
    squared error (float64)."""

    def __init__(self, layout, n, dtype):
        rows = [n] * len(layout.layers)
        super().__init__(layer_entries(layout, rows) + [pack_entry(layout, rows, dtype)], dtype)
        self.err = np.zeros(n, dtype=np.float64)


class AENumbaBackend:
    """Same interface and numbers as AENumpyBackend (§13), computed by the fused kernels."""
    name = "numba"
    update_kernels = NumbaBackend.update_kernels      # the fused one-pass optimizers (§8)
    max_workspaces = 4

    def __init__(self, spec, dtype):
        self.spec = spec
        self.layout = spec.layout
        self.dtype = np.dtype(dtype)
        self.ne = len(spec.hidden)
        self.lay = layer_table(self.layout)
        self.act = ACT_CODES[spec.activation]
        self._ws = OrderedDict()

    def workspace(self, n) -> AEWorkspace:
        """The buffers of an n-row pass, allocated on first use and then reused."""
        return cached_workspace(self._ws, n, self.max_workspaces, lambda: AEWorkspace(self.layout, n, self.dtype))

    _gemm = staticmethod(gemm_settings)

    def _pass(self, params, x, grad):
        """Forward (§13.1) and, when ``grad`` is given, backward (§13.2) into it; returns the loss.

        The @njit blocks are composed here, in Python, rather than inside a cached @njit caller: a
        cached caller in this module that links cpu.py's cache-loaded blocks (whose GEMM holds a
        parallel region) was seen to crash a later process loading it (numba 0.6x). The five
        dispatches cost a few microseconds a step.
        """
        if params.dtype != self.dtype or x.dtype != self.dtype:
            raise ValueError(f"params and x must be {self.dtype}, got {params.dtype} and {x.dtype}")
        if not x.flags.c_contiguous:
            raise ValueError("x must be a C-contiguous array")
        n = x.shape[0]
        gemm, mb, nb = self._gemm()
        ws = self.workspace(n)
        nl, ne, lay, act, bo, w = len(self.lay), self.ne, self.lay, self.act, ws.bo, ws.ws
        p1 = ws.view("pack")[0]
        mlp_fwd_(params, lay, 0, ne, x, w, bo, act, gemm, p1, mb, nb)                  # z: buffer ne
        z = self._out(ws, ne)
        mlp_fwd_(params, lay, ne + 1, nl - 1, z, w, bo, act, gemm, p1, mb, nb)         # logits
        head = self._out(ws, nl - 1)
        want = grad is not None
        sq_error_sigmoid_(head, x, ws.err, 1.0 / n, want)                             # head <- dlogits
        if want:
            dz = self._out(ws, nl + ne)
            mlp_bwd_(params, grad, lay, ne + 1, nl - 1, z, head, dz, w, bo, nl, act, gemm, p1,
                     mb, nb, True, p1[:0])
            mlp_bwd_(params, grad, lay, 0, ne, x, dz, dz, w, bo, nl, act, gemm, p1, mb, nb, False, p1[:0])
        return float(ws.err.sum() / n), ws

    def _out(self, ws, t):
        o, r, c = ws.bo[t]
        return ws.ws[o:o + r * c].reshape(r, c)

    def encode(self, params, x):
        """x: (n, D) -> z: (n, Z)."""
        gemm, mb, nb = self._gemm()
        ws = self.workspace(x.shape[0])
        mlp_fwd_(params, self.lay, 0, self.ne, x, ws.ws, ws.bo, self.act, gemm, ws.view("pack")[0], mb, nb)
        return self._out(ws, self.ne).copy()

    def decode(self, params, z):
        """z: (m, Z) -> x_hat: (m, D) in [0, 1]."""
        z = np.ascontiguousarray(z, dtype=self.dtype)
        gemm, mb, nb = self._gemm()
        ws = self.workspace(z.shape[0])
        nl = len(self.lay)
        mlp_fwd_(params, self.lay, self.ne + 1, nl - 1, z, ws.ws, ws.bo, self.act, gemm, ws.view("pack")[0], mb, nb)
        head = self._out(ws, nl - 1)
        sigmoid_(head)
        return head.copy()

    def sq_error(self, params, x):
        """Per-example squared error (n,)."""
        _, ws = self._pass(params, x, None)
        return ws.err.astype(self.dtype)

    def loss_and_grad(self, params, x, grad=None):
        """loss = 1/n sum_i e_i and its gradient in the flat layout.   §13.2"""
        if grad is None:
            grad = np.empty(self.layout.size, dtype=self.dtype)
        loss, _ = self._pass(params, x, grad)
        return loss, grad
