"""The NumPy reference backend: the oracle every other backend is tested against (docs/math.md §6).

It composes the paired functions of layers.py, distributions.py and objectives.py into one forward
and one backward pass. It favours clarity over speed and allocates freely.

Shape legend: n examples, D = x_dim, Z = z_dim, L samples (k for IWAE), K head width (D or 2D).
"""
from __future__ import annotations

import numpy as np

from .. import distributions as dist
from .. import objectives as obj
from ..estimators import score_backward
from ..layers import linear_backward, linear_forward, mlp_backward, mlp_forward


class NumpyBackend:
    name = "numpy"

    def __init__(self, spec, dtype):
        self.spec = spec               # ModelSpec: x_dim, z_dim, hidden, dec_hidden, activation, ...
        self.layout = spec.layout
        self.dtype = np.dtype(dtype)

    # -- pieces --------------------------------------------------------------------------------
    def _split(self, params):
        enc = self.layout.layer_views(params, "enc")
        dec = self.layout.layer_views(params, "dec")
        return enc[:-1], enc[-1], dec[:-1], dec[-1]

    def encode(self, params, x):
        """x: (n, D) -> mu, logvar: (n, Z)."""
        enc_h, (Wh, bh), _, _ = self._split(params)
        h, _ = mlp_forward(x, enc_h, self.spec.activation)
        out, _ = linear_forward(h, Wh, bh)                   # (n, 2Z)
        Z = self.spec.z_dim
        return out[:, :Z], out[:, Z:]

    def decode(self, params, z):
        """z: (m, Z) -> head: (m, K), the likelihood's parameters."""
        _, _, dec_h, (Wd, bd) = self._split(params)
        h, _ = mlp_forward(z, dec_h, self.spec.activation)
        head, _ = linear_forward(h, Wd, bd)
        return head

    # -- the whole pass -------------------------------------------------------------------------
    def forward(self, params, x, eps):
        """Every intermediate of one pass, for the bounds and for backward."""
        s = self.spec
        enc_h, (Wh, bh), dec_h, (Wd, bd) = self._split(params)
        L, n, Z = eps.shape
        h, enc_caches = mlp_forward(x, enc_h, s.activation)              # (n, H)
        out, enc_head_cache = linear_forward(h, Wh, bh)                  # (n, 2Z)
        mu, logvar = out[:, :Z], out[:, Z:]
        z, rep_cache = dist.reparam_forward(mu, logvar, eps)             # (L, n, Z)
        hd, dec_caches = mlp_forward(z.reshape(L * n, Z), dec_h, s.activation)
        head, dec_head_cache = linear_forward(hd, Wd, bd)                # (L*n, K)
        head = head.reshape(L, n, -1)
        ll = dist.loglik_forward(s.likelihood, x, head, s.var_floor)     # (L, n)
        return dict(x=x, eps=eps, mu=mu, logvar=logvar, z=z, head=head, ll=ll,
                    caches=(enc_caches, enc_head_cache, rep_cache, dec_caches, dec_head_cache))

    def bound(self, params, x, eps, objective="elbo", beta=1.0):
        """Per-example bound (n,): the ELBO with analytic KL, or the IWAE bound."""
        f = self.forward(params, x, eps)
        if objective == "elbo":
            return obj.elbo_per_example(f["ll"], dist.kl_forward(f["mu"], f["logvar"]), beta)
        logw = obj.log_weights(f["ll"], dist.log_prior(f["z"]),
                               dist.log_posterior_eps(f["logvar"], eps), beta)
        return obj.iwae_per_example(logw)

    def loss_and_grad(self, params, x, eps, beta=1.0, objective="elbo", free_bits=0.0, grad=None,
                      kl_active=None, estimator="reparam"):
        """Batch mean of the negative bound and its gradient in the flat layout.   §6
        ``estimator="score"`` (ELBO): the encoder's part is the REINFORCE estimate of §5.4."""
        s = self.spec
        f = self.forward(params, x, eps)
        enc_caches, enc_head_cache, rep_cache, dec_caches, dec_head_cache = f["caches"]
        mu, logvar, z, head, ll = f["mu"], f["logvar"], f["z"], f["head"], f["ll"]
        L, n, Z = eps.shape

        if objective == "elbo":
            kl = dist.kl_forward(mu, logvar)                              # (n, Z)
            loss, dll, dkl = obj.elbo_loss(ll, kl, beta, free_bits, kl_active)
            dmu_kl, dlogvar_kl = dist.kl_backward(dkl, mu, logvar)
            dz_prior = 0.0
            dlogvar_q = 0.0
        else:
            logw = obj.log_weights(ll, dist.log_prior(z), dist.log_posterior_eps(logvar, eps), beta)
            loss, dlogw = obj.iwae_loss(logw)                             # dlogw: (k, n)
            dll = dlogw
            dmu_kl = dlogvar_kl = 0.0
            dz_prior = (beta * dlogw)[..., None] * (-z)                   # d log p(z)/dz = -z
            dlogvar_q = 0.5 * beta * dlogw.sum(axis=0)[:, None]           # d log w/dlogvar = -beta d log q/dlogvar = beta/2

        dhead = dist.loglik_backward(s.likelihood, x, head, dll, s.var_floor)   # (L, n, K)
        dhd, dWd, dbd = linear_backward(dhead.reshape(L * n, -1), dec_head_cache)
        dzf, dec_grads = mlp_backward(dhd, dec_caches)                    # (L*n, Z)
        dz = dzf.reshape(L, n, Z) + dz_prior
        if estimator == "score":      # §5.4: z held fixed, log p(x|z) weights d log q(z|x)/d(mu, logvar)
            dmu, dlogvar = score_backward(dll * ll, eps, logvar)
        else:
            dmu, dlogvar = dist.reparam_backward(dz, rep_cache)
        dmu = dmu + dmu_kl
        dlogvar = dlogvar + dlogvar_kl + dlogvar_q
        dout = np.concatenate([dmu, dlogvar], axis=1)                     # (n, 2Z)
        dh, dWh, dbh = linear_backward(dout, enc_head_cache)
        _, enc_grads = mlp_backward(dh, enc_caches)

        if grad is None:
            grad = np.empty(self.layout.size, dtype=self.dtype)
        pairs = enc_grads + [(dWh, dbh)] + dec_grads + [(dWd, dbd)]
        for (prefix, _, _), (dW, db) in zip(self.layout.layers, pairs):
            self.layout.view(grad, prefix + ".W")[...] = dW
            self.layout.view(grad, prefix + ".b")[...] = db
        return loss, grad
