"""The NumPy reference backend: the oracle every other backend is tested against (docs/math.md §6, §11).

It composes the paired functions of layers.py, distributions.py and objectives.py into one forward
and one backward pass, for a stack of S stochastic layers (S = 1 is the one-layer VAE). Four stages,
shared by every S, each a forward/backward pair:
    block       an MLP with a linear head (layers.py)                               §2
    gaussian    reparameterization, log N(z; mu, logvar), log p(z), log q in eps     §3, §11.1
    likelihood  log p(x | z_1) (distributions.py)                                    §4
    objective   ELBO (top KL analytic) or IWAE log-mean-exp of log-weights           §5, §11.2
It favours clarity over speed and allocates freely.

Shape legend: n examples, D = x_dim, Z_l = z_dims[l-1], L samples (k for IWAE), K head width (D or 2D),
R rows of a block's input (n for q(z_1|x), L*n otherwise). Layers are numbered l = 1..S bottom to top;
Python lists index them from 0 (``enc[l-1]`` is layer l).
"""
from __future__ import annotations

from types import MappingProxyType

import numpy as np

from .. import distributions as dist
from .. import objectives as obj
from ..estimators import score_backward
from ..layers import linear_backward, linear_forward, mlp_backward, mlp_forward


class NumpyBackend:
    name = "numpy"
    # the optional capabilities of kernels/interface.Backend, declared
    estimators = ("reparam", "score", "dreg")   # objectives.ESTIMATORS this backend implements
    make_trainer = None                         # trains through trainers.HostTrainer
    update_kernels = MappingProxyType({})       # optim.py's NumPy updates

    def __init__(self, spec, dtype):
        self.spec = spec               # ModelSpec: x_dim, z_dim(s), hidden, dec_hidden, activation, ...
        self.layout = spec.layout
        self.dtype = np.dtype(dtype)
        self.S = spec.n_stochastic

    # -- stage: an MLP block with a linear head (§2) --------------------------------------------
    def _block_forward(self, params, prefix, h):
        """h: (R, I) -> out: (R, O), the head's output, and the cache of the block."""
        layers = self.layout.layer_views(params, prefix)
        hh, mlp_caches = mlp_forward(h, layers[:-1], self.spec.activation)
        out, head_cache = linear_forward(hh, *layers[-1])
        return out, (mlp_caches, head_cache)

    @staticmethod
    def _block_backward(dout, cache):
        """dout: (R, O) -> dh: (R, I) and [(dW, db), ...] for the hidden layers and the head."""
        mlp_caches, head_cache = cache
        dhh, dW, db = linear_backward(dout, head_cache)
        dh, grads = mlp_backward(dhh, mlp_caches)
        return dh, grads + [(dW, db)]

    def _eps_list(self, eps):
        return (eps,) if self.S == 1 else tuple(eps)

    # -- pieces --------------------------------------------------------------------------------
    def encode(self, params, x):
        """q(z_1|x): x (n, D) -> mu, logvar: (n, Z_1)."""
        out, _ = self._block_forward(params, "enc", x)       # (n, 2Z_1)
        Z = self.spec.z_dims[0]
        return out[:, :Z], out[:, Z:]

    def encode_up(self, params, z_below, l):
        """q(z_l|z_{l-1}) for l >= 2: z_below (m, Z_{l-1}) -> mu, logvar: (m, Z_l)."""
        out, _ = self._block_forward(params, self.spec.enc_prefix(l), z_below)
        Z = self.spec.z_dims[l - 1]
        return out[:, :Z], out[:, Z:]

    def decode(self, params, z):
        """z_1: (m, Z_1) -> head: (m, K), the likelihood's parameters."""
        head, _ = self._block_forward(params, "dec", z)
        return head

    def decode_down(self, params, z, l):
        """p(z_{l-1}|z_l) for l >= 2: z (m, Z_l) -> mu, logvar: (m, Z_{l-1})."""
        out, _ = self._block_forward(params, self.spec.dec_prefix(l), z)
        Z = self.spec.z_dims[l - 2]
        return out[:, :Z], out[:, Z:]

    def generate_down(self, params, z_top, rng=None):
        """z_S (m, Z_S) -> z_1 (m, Z_1) through p(z_{l-1}|z_l): the means, or draws when ``rng``."""
        z = z_top
        for l in range(self.S, 1, -1):
            mu, logvar = self.decode_down(params, z, l)
            z = mu if rng is None else mu + np.exp(0.5 * logvar) * rng.standard_normal(mu.shape).astype(mu.dtype)
        return z

    # -- the whole pass -------------------------------------------------------------------------
    def forward(self, params, x, eps):
        """Every intermediate of one pass, for the bounds and for backward.   §6 F1-F6, §11.3

        Returns a dict: ``q`` a list over layers l = 1..S of dicts (mu, logvar, z, eps, block and
        reparam caches); ``p`` a list over l = 2..S of dicts (mu, logvar of p(z_{l-1}|z_l), cache);
        head, ll and the likelihood block's cache; and, for the one-layer code that reads them,
        mu, logvar, z of layer 1.
        """
        s = self.spec
        eps = self._eps_list(eps)
        L, n = eps[0].shape[:2]
        q = []
        h = x                                                            # (R, I): x, then z_{l-1}
        for l, Z in enumerate(s.z_dims, start=1):
            out, bc = self._block_forward(params, s.enc_prefix(l), h)    # F1-F2: (R, 2Z_l)
            mu, logvar = out[:, :Z], out[:, Z:]
            if l > 1:                                                    # rows are (sample, example)
                mu, logvar = mu.reshape(L, n, Z), logvar.reshape(L, n, Z)
            z, rc = dist.reparam_forward(mu, logvar, eps[l - 1])         # F3: (L, n, Z_l)
            q.append(dict(mu=mu, logvar=logvar, z=z, eps=eps[l - 1], block=bc, rep=rc))
            h = z.reshape(L * n, Z)
        p = [None, None]                                                 # p[l]: p(z_{l-1}|z_l), l >= 2
        for l in range(2, s.n_stochastic + 1):                           # G: (L*n, 2Z_{l-1})
            Zb = s.z_dims[l - 2]
            out, bc = self._block_forward(params, s.dec_prefix(l), q[l - 1]["z"].reshape(L * n, -1))
            p.append(dict(mu=out[:, :Zb].reshape(L, n, Zb), logvar=out[:, Zb:].reshape(L, n, Zb), block=bc))
        Z1 = s.z_dims[0]
        head, dec_cache = self._block_forward(params, "dec", q[0]["z"].reshape(L * n, Z1))  # F4-F5
        head = head.reshape(L, n, -1)
        ll = dist.loglik_forward(s.likelihood, x, head, s.var_floor)     # F6: (L, n)
        return dict(x=x, eps=eps[0] if self.S == 1 else eps, q=q, p=p, head=head, ll=ll,
                    dec=dec_cache, mu=q[0]["mu"], logvar=q[0]["logvar"], z=q[0]["z"])

    def terms(self, f):
        """The log-density terms of log w (§11.2), each (L, n):
        logp[l-1] = log p(z_l|z_{l+1}) (l < S) or log p(z_S) (l = S); logq[l-1] = log q(z_l|z_{l-1})
        in eps form (§3.3)."""
        q, p = f["q"], f["p"]
        S = self.S
        logp = [dist.gauss_logpdf(q[l - 1]["z"], p[l + 1]["mu"], p[l + 1]["logvar"]) for l in range(1, S)]
        logp.append(dist.log_prior(q[S - 1]["z"]))
        logq = [dist.log_posterior_eps(ql["logvar"], ql["eps"]) for ql in q]
        return logp, logq

    def log_weights(self, f, beta=1.0):
        """log w = ll + beta (sum_l log p - sum_l log q).   (k, n)   §5.2, §11.2"""
        logp, logq = self.terms(f)
        return obj.log_weights(f["ll"], _total(logp), _total(logq), beta)

    def _elbo_parts(self, f):
        """S > 1: mid = sum_{l<S} (log p(z_l|z_{l+1}) - log q(z_l|z_{l-1})) (L, n) and the top
        layer's analytic KL(q(z_S|z_{S-1}) || N(0, I)) (L, n, Z_S).   §11.2"""
        logp, logq = self.terms(f)
        mid = _total([a - b for a, b in zip(logp[:-1], logq[:-1])])
        top = f["q"][-1]
        return mid, dist.kl_forward(top["mu"], top["logvar"])

    def bound(self, params, x, eps, objective="elbo", beta=1.0):
        """Per-example bound (n,): the ELBO with the top KL analytic, or the IWAE bound."""
        f = self.forward(params, x, eps)
        if objective == "elbo":
            if self.S == 1:
                return obj.elbo_per_example(f["ll"], dist.kl_forward(f["mu"], f["logvar"]), beta)
            mid, kl = self._elbo_parts(f)
            return obj.stack_elbo_per_example(f["ll"], mid, kl, beta)
        return obj.iwae_per_example(self.log_weights(f, beta))

    def loss_and_grad(self, params, x, eps, beta=1.0, objective="elbo", free_bits=0.0, grad=None,
                      kl_active=None, estimator="reparam"):
        """Batch mean of the negative bound and its gradient in the flat layout.   §6, §11.3, §12
        ``estimator="score"`` (ELBO, S = 1): the encoder's part is the REINFORCE estimate of §5.4."""
        f = self.forward(params, x, eps)
        S = self.S
        if objective == "elbo":
            if S == 1:                                                   # B1 (ELBO, §6)
                kl = dist.kl_forward(f["mu"], f["logvar"])                # (n, Z)
                loss, dll, dkl = obj.elbo_loss(f["ll"], kl, beta, free_bits, kl_active)
                up = dict(dll=dll, dlogp=[None], dlogq=[None], dkl=dkl, score=estimator == "score")
            else:                                                        # B1 (ELBO, §11.2)
                mid, kl = self._elbo_parts(f)
                loss, dll, dmid, dkl = obj.stack_elbo_loss(f["ll"], mid, kl, beta)
                up = dict(dll=dll, dlogp=[dmid] * (S - 1) + [None], dlogq=[-dmid] * (S - 1) + [None], dkl=dkl)
            grads = self.backward(f, params, **up)
        else:                                                            # B1 (IWAE, §5.2, §11.2)
            logw = self.log_weights(f, beta)
            loss, dlogw = obj.iwae_loss(logw)                             # dlogw: (k, n)
            grads = self.backward(f, params, **self._iwae_upstream(dlogw, beta))
            if estimator == "dreg":                                      # §12: the inference blocks
                dlogw_inf = obj.dreg_weights(logw, beta)                 # by the path alone
                inf = self.backward(f, params, q_stopped=True, **self._iwae_upstream(dlogw_inf, beta))
                grads.update({k: v for k, v in inf.items() if k.startswith("enc")})
        if grad is None:
            grad = np.empty(self.layout.size, dtype=self.dtype)
        self._scatter(grads, grad)
        return loss, grad

    def _iwae_upstream(self, dlogw, beta):
        """d(loss)/d(each term) from d(loss)/d(log w): ll 1, every log p beta, every log q -beta."""
        return dict(dll=dlogw, dlogp=[beta * dlogw] * self.S, dlogq=[-beta * dlogw] * self.S, dkl=None)

    def backward(self, f, params, dll, dlogp, dlogq, dkl=None, q_stopped=False, score=False):
        """Vector-Jacobian product of the loss w.r.t. every block's parameters.   §6 B2-B9, §11.3

        Upstream gradients, each (L, n) or None when the term is absent: ``dll`` of log p(x|z_1);
        ``dlogp[l-1]`` of log p(z_l|z_{l+1}) (log p(z_S) for l = S); ``dlogq[l-1]`` of log q(z_l|z_{l-1});
        ``dkl`` of the top layer's analytic KL, (n, Z) for S = 1 or (L, n, Z_S).
        ``q_stopped`` (DReG, §12): log q(z_l|z_{l-1}) is log N(z_l; mu_l, logvar_l) with the explicit
        dependence on the inference parameters stopped; its paths through z_l and z_{l-1} are kept.
        ``score`` (S = 1, §5.4): z_1 is held fixed; the inference block gets the score-function
        estimate sum dll * log p(x|z) * d log q(z|x)/d(mu, logvar) instead of the path through z_1.
        Returns {prefix: [(dW, db), ...]} for every block.
        """
        s = self.spec
        q, p, x = f["q"], f["p"], f["x"]
        S = self.S
        L, n = f["ll"].shape
        grads = {}
        dz = [None] * S                                                  # dz[l-1]: d loss / d z_l, (L, n, Z_l)

        def add(l, g):
            dz[l - 1] = g if dz[l - 1] is None else dz[l - 1] + g

        # B2-B4 likelihood, then the block of p(x|z_1)
        dhead = dist.loglik_backward(s.likelihood, x, f["head"], dll, s.var_floor)       # (L, n, K)
        dzf, grads["dec"] = self._block_backward(dhead.reshape(L * n, -1), f["dec"])     # (L*n, Z_1)
        add(1, dzf.reshape(L, n, -1))
        # G' the generative conditionals p(z_{l-1}|z_l), l = 2..S, and the prior p(z_S)
        for l in range(2, S + 1):
            if dlogp[l - 2] is None:
                continue
            dzb, dmu, dlv = dist.gauss_logpdf_backward(dlogp[l - 2], q[l - 2]["z"], p[l]["mu"], p[l]["logvar"])
            add(l - 1, dzb)
            dout = np.concatenate([dmu, dlv], axis=-1).reshape(L * n, -1)                # (L*n, 2Z_{l-1})
            dzt, grads[s.dec_prefix(l)] = self._block_backward(dout, p[l]["block"])
            add(l, dzt.reshape(L, n, -1))
        if dlogp[S - 1] is not None:
            add(S, dist.log_prior_backward(dlogp[S - 1], q[S - 1]["z"]))
        # B5-B8 the inference blocks, top down: dz_l is complete once layer l+1 is done
        for l in range(S, 0, -1):
            ql = q[l - 1]
            mu, logvar = ql["mu"], ql["logvar"]
            dzl = dz[l - 1] if dz[l - 1] is not None else np.zeros_like(ql["z"])
            stopped = None
            if dlogq[l - 1] is not None and q_stopped:
                dzq, dmu_q, dlv_q = dist.gauss_logpdf_backward(dlogq[l - 1], ql["z"],
                                                               np.broadcast_to(mu, ql["z"].shape),
                                                               np.broadcast_to(logvar, ql["z"].shape))
                dzl = dzl + dzq
                stopped = (_sum_to(dmu_q, mu.shape), _sum_to(dlv_q, logvar.shape))
            if score and l == 1:                                         # B5, §5.4: z_1 held fixed
                dmu, dlogvar = score_backward(dll * f["ll"], ql["eps"], logvar)
            else:
                dmu, dlogvar = dist.reparam_backward(dzl, ql["rep"])     # B5
            if l == S and dkl is not None:                               # B6: analytic KL
                dmu_kl, dlv_kl = dist.kl_backward(dkl, mu, logvar)
                dmu, dlogvar = dmu + dmu_kl, dlogvar + dlv_kl
            if dlogq[l - 1] is not None and not q_stopped:               # B6: log q in eps form
                dlogvar = dlogvar + dist.log_posterior_eps_backward(dlogq[l - 1], logvar)
            rows = -1 if l == 1 else L * n
            dout = np.concatenate([dmu, dlogvar], axis=-1).reshape(rows, 2 * mu.shape[-1])
            dh, grads[s.enc_prefix(l)] = self._block_backward(dout, ql["block"])        # B7-B8
            if stopped is not None:                                      # z_{l-1}'s path only
                dh_q, _ = self._block_backward(np.concatenate(stopped, axis=-1).reshape(dout.shape), ql["block"])
                dh = dh + dh_q
            if l > 1:
                add(l - 1, dh.reshape(L, n, -1))
        return grads

    def _scatter(self, grads, grad):
        """B9: every block's (dW, db) into the views of the flat ``grad``, in layout order."""
        for prefix in dict.fromkeys(p.split(".")[0] for p, _, _ in self.layout.layers):
            names = [p for p, _, _ in self.layout.layers if p.split(".")[0] == prefix]
            for name, (dW, db) in zip(names, grads[prefix]):
                self.layout.view(grad, name + ".W")[...] = dW
                self.layout.view(grad, name + ".b")[...] = db


def _total(terms):
    """Sum of a list of (L, n) arrays, left to right."""
    out = terms[0]
    for t in terms[1:]:
        out = out + t
    return out


def _sum_to(a, shape):
    """Sum ``a`` over its leading axes down to ``shape`` (the sample axis of a broadcast mu)."""
    while a.ndim > len(shape):
        a = a.sum(axis=0)
    return a

