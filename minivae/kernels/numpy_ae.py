"""The NumPy reference backend of the deterministic Autoencoder (docs/math.md §11).

The same paired functions of layers.py as the VAE's reference (kernels/numpy_.py), composed without
a posterior: the encoder head *is* the code z, and the decoder's head goes through a sigmoid.

Shape legend: n examples, D = x_dim, Z = z_dim, H hidden widths.
"""
from __future__ import annotations

import numpy as np

from ..layers import _sigmoid, linear_backward, linear_forward, mlp_backward, mlp_forward


def sq_error_forward(x, logits):
    """x_hat = sigmoid(logits);  e_i = sum_d (x_hat_id - x_id)^2.   x, logits: (n, D) -> e: (n,).  §11.1"""
    xhat = _sigmoid(logits)
    r = xhat - x                                            # (n, D) residual
    return np.einsum("nd,nd->n", r, r), (r, xhat)


def sq_error_backward(de, cache):
    """dlogits = de_i * 2 (x_hat - x) * x_hat (1 - x_hat).   de: (n,) -> (n, D).   §11.2"""
    r, xhat = cache
    return (2 * de)[:, None] * r * xhat * (1 - xhat)


class AENumpyBackend:
    name = "numpy"

    def __init__(self, spec, dtype):
        self.spec = spec               # AESpec: x_dim, z_dim, hidden, dec_hidden, activation
        self.layout = spec.layout
        self.dtype = np.dtype(dtype)

    def _split(self, params):
        enc = self.layout.layer_views(params, "enc")
        dec = self.layout.layer_views(params, "dec")
        return enc[:-1], enc[-1], dec[:-1], dec[-1]

    def encode(self, params, x):
        """x: (n, D) -> z: (n, Z), the encoder head's output (no nonlinearity).   §11.1"""
        enc_h, (We, be), _, _ = self._split(params)
        h, _ = mlp_forward(x, enc_h, self.spec.activation)
        z, _ = linear_forward(h, We, be)
        return z

    def decode_logits(self, params, z):
        """z: (m, Z) -> logits: (m, D), before the sigmoid.   §11.1"""
        _, _, dec_h, (Wd, bd) = self._split(params)
        h, _ = mlp_forward(z, dec_h, self.spec.activation)
        a, _ = linear_forward(h, Wd, bd)
        return a

    def decode(self, params, z):
        """z: (m, Z) -> x_hat = sigmoid(logits): (m, D), in [0, 1]."""
        return _sigmoid(self.decode_logits(params, z))

    def sq_error(self, params, x):
        """Per-example squared error sum_d (x_hat_id - x_id)^2, shape (n,)."""
        e, _ = sq_error_forward(x, self.decode_logits(params, self.encode(params, x)))
        return e

    def loss_and_grad(self, params, x, grad=None):
        """loss = 1/n sum_i e_i and its gradient in the flat layout.   §11.2"""
        s = self.spec
        enc_h, (We, be), dec_h, (Wd, bd) = self._split(params)
        n = x.shape[0]
        h, enc_caches = mlp_forward(x, enc_h, s.activation)          # (n, H)
        z, enc_head_cache = linear_forward(h, We, be)                # (n, Z)
        hd, dec_caches = mlp_forward(z, dec_h, s.activation)         # (n, H')
        a, dec_head_cache = linear_forward(hd, Wd, bd)               # (n, D) logits
        e, sq_cache = sq_error_forward(x, a)                         # (n,)
        loss = float(e.sum() / n)

        de = np.full(n, 1.0 / n, dtype=x.dtype)                      # dloss/de_i = 1/n
        da = sq_error_backward(de, sq_cache)                         # (n, D)
        dhd, dWd, dbd = linear_backward(da, dec_head_cache)
        dz, dec_grads = mlp_backward(dhd, dec_caches)                # (n, Z)
        dh, dWe, dbe = linear_backward(dz, enc_head_cache)
        _, enc_grads = mlp_backward(dh, enc_caches)

        if grad is None:
            grad = np.empty(self.layout.size, dtype=self.dtype)
        pairs = enc_grads + [(dWe, dbe)] + dec_grads + [(dWd, dbd)]
        for (prefix, _, _), (dW, db) in zip(self.layout.layers, pairs):
            self.layout.view(grad, prefix + ".W")[...] = dW
            self.layout.view(grad, prefix + ".b")[...] = db
        return loss, grad
