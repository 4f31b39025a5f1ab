"""The cuda backend for stacks of S > 1 stochastic layers (docs/math.md §11, §12).

``loss_and_grad`` and ``bound`` run the whole pass on the device, stage by stage as
kernels/cpu_stack.py's ``stack_step_`` (the same order, the same per-row float64 sums):

    block       per layer t: a_t = [h_{t-1} | 1] [W_t; b_t], h_t = f(a_t) (identity for the head):
                CudaBackend._linear, one GEMM with the EPI_ACT epilogue (fused), or a GEMM and
                ``bias_act`` (unfused); backward per layer, top down: [dW_t; db_t] = [h_{t-1} | 1]^T g_t
                and g_{t-1} = (g_t W_t^T) * f'(h_{t-1}) (CudaBackend._linear_backward); DReG's
                input-only pass into a scratch [W; b] gradient.   oracle: layers.mlp_forward / mlp_backward
    gaussian    cuda_kernels.stack_gauss_fwd / stack_posterior_bwd (reparameterization, log q in eps
                or, under DReG, stopped; the top KL), stack_gauss_logpdf_add / _bwd (log p(z_{l-1}|z_l)),
                stack_prior_add / _bwd, stack_logq_eps_add, stack_kl_add                     §3, §11.1
    likelihood  the one-layer backend's ``likelihood`` kernel: log p(x|z_1) per row and the head's
                score, into the dec block's upstream buffer                                   §4
    objective   ``iwae_weights`` (softmax weights, bound, loss) or stack_elbo_bound; stack_upstream,
                DReG's stack_dreg_factor and stack_scale_rows_by                        §5, §11.2, §12

Each stack kernel names its NumPy oracle (tests/cuda_sim/sim_stack_kernels.py checks each against it);
the oracle of the whole pass is ``NumpyBackend`` (tests/cuda_sim/sim_stack.py). The parameters go to
the device once per pass, the gradient comes back once; x and eps go up, the loss (or the bound)
comes back. Device buffers are preallocated per (n, L) (:class:`_StackBuffers`) and per MLP block and
rows (:class:`_BlockBuffers`). The pieces (encode, decode, sampling) are the reference's composition
with the blocks on the device (``_block_forward``). ``make_trainer`` returns a :class:`CudaStackTrainer`
(kernels/cuda.py's CudaTrainer driving this pass): parameters, gradient and optimizer state stay on
the device between steps; x and eps go up each step (DReG trains through trainers.HostTrainer).
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .cpu import cached_workspace
from .cuda import CudaBackend, CudaTrainer, _Layer, grad_to_host, recording_backend, unavailable_reason
from .interface import require_estimator
from .numpy_ import NumpyBackend


class _BlockBuffers:
    """The device buffers of one MLP block for R rows: widths w_0 = I (the input), w_1 .. w_T (the
    layers' outputs; w_T = O, the head).   §2.3

        inp     (R, w_0)          the block's input, uploaded
        h[t]    (R, w_{t+1})      layer t's output f(a_t); h[-1] is the head's a_T, copied back
        dout    (R, w_T)          d loss / d head, uploaded
        dh[t]   (R, w_t)          d loss / d (layer t's input); dh[0] is the block input's, copied back
        grad    (sum_t (w_t + 1) w_{t+1},)   the block's [W; b] gradients, in layout order, copied back
        g[t]    _Layer views of ``grad`` for layer t
    """

    def __init__(self, cuda, dtype, rows, shapes):
        def e(*shape):
            return cuda.device_array(shape, dtype=dtype)
        self.inp = e(rows, shapes[0][0])
        self.h = [e(rows, fan_out) for _, fan_out in shapes]
        self.dout = e(rows, shapes[-1][1])
        self.dh = [e(rows, fan_in) for fan_in, _ in shapes]
        self.grad = e(sum((fan_in + 1) * fan_out for fan_in, fan_out in shapes))
        self.g, off = [], 0
        for fan_in, fan_out in shapes:
            self.g.append(_Layer(self.grad, off, fan_in, fan_out))
            off += (fan_in + 1) * fan_out


class _StackBuffers:
    """The device buffers of one (n, L) pass besides the blocks' (R = L n rows), as cpu_stack's
    StackWorkspace:  x (n, D);  per layer l = 1..S (index s = l - 1): eps (L, n, Z_l), z, dz (R, Z_l),
    std ((n if l = 1 else R), Z_l), tmp (R, Z_l) (enc{l+1}'s input gradient), sq (R, 2 Z_l) (DReG's
    stopped upstream of enc{l}, l > 1), u (R, Z_l) (of log p(z_l|z_{l+1}), l < S);  float64: logw,
    dlogw, ap, aq, fac (R,), bound (n,), zeros (L, n)."""

    def __init__(self, cuda, spec, dtype, n, L):
        R = L * n

        def e(*shape, dt=dtype):
            return cuda.device_array(shape, dtype=dt)
        self.n, self.L = n, L
        self.x = e(n, spec.x_dim)
        Zs = spec.z_dims
        self.eps = [e(L, n, Z) for Z in Zs]
        self.z = [e(R, Z) for Z in Zs]
        self.dz = [e(R, Z) for Z in Zs]
        self.std = [e(n if s == 0 else R, Z) for s, Z in enumerate(Zs)]
        self.tmp = [e(R, Z) for Z in Zs]
        self.sq = [e(R if s > 0 else 1, 2 * Z) for s, Z in enumerate(Zs)]
        self.u = [e(R, Z) for Z in Zs]
        self.logw, self.dlogw, self.ap, self.aq, self.fac = (e(R, dt=np.float64) for _ in range(5))
        self.bound = e(n, dt=np.float64)
        self.zeros = cuda.to_device(np.zeros((L, n)))


class CudaStackBackend(NumpyBackend):
    """NumpyBackend with the MLP blocks in numba.cuda kernels; built through ``kernels.stack_class``
    for backend 'cuda' and S > 1. Host arrays in and out, as every backend."""
    name = "cuda"
    estimators = ("reparam", "dreg")   # score is for one stochastic layer
    max_buffers = 32          # (block, rows) buffer sets kept; the least recently used is dropped
    max_workspaces = 4        # (n, L) _StackBuffers kept

    def __init__(self, spec, dtype, config=None):
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend 'cuda' is unavailable: {reason}")
        from numba import cuda
        from numba.cuda.random import create_xoroshiro128p_states
        # the one-layer backend's launch machinery (gemm, _linear, _linear_backward), without its
        # one-layer workspaces: _setup is everything of CudaBackend but its availability checks
        dev = CudaBackend.__new__(CudaBackend)
        dev._setup(spec, dtype, config, cuda, create_xoroshiro128p_states)     # config None: cuda.CONFIG
        self._setup(spec, dtype, dev)

    def _setup(self, spec, dtype, dev):
        """Everything but the availability check; ``dev`` launches the kernels (a CudaBackend, or
        cuda.recording_backend's stand-in that records the launches)."""
        super().__init__(spec, dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"backend 'cuda' computes in float32 or float64, got {self.dtype}")
        self.dev = dev
        self.cuda, self.config = dev.cuda, dev.config
        self.act = dev.act
        self._blocks = {}
        for prefix, fan_in, fan_out in self.layout.layers:      # block -> [(offset, I_t, O_t), ...]
            self._blocks.setdefault(prefix.split(".")[0], []).append(
                (self.layout.slots[prefix + ".W"].offset, fan_in, fan_out))
        self._P = None            # device views of this pass's parameters, while forward runs
        self._bufs = {}
        self._ws = OrderedDict()

    @property
    def launches(self):
        """Kernel launches since construction."""
        return self.dev.launches

    # -- device buffers ------------------------------------------------------------------------
    def _buffers(self, prefix, rows) -> _BlockBuffers:
        key = (prefix, rows)
        bufs = self._bufs.pop(key, None)
        if bufs is None:
            if len(self._bufs) >= self.max_buffers:
                self._bufs.pop(next(iter(self._bufs)))           # the least recently used
            shapes = [(fan_in, fan_out) for _, fan_in, fan_out in self._blocks[prefix]]
            bufs = _BlockBuffers(self.cuda, self.dtype, rows, shapes)
        self._bufs[key] = bufs
        return bufs

    def _upload(self, params):
        """{block: [_Layer, ...]}: device views of the flat parameters (one copy to the device)."""
        return self._views(self.cuda.to_device(np.ascontiguousarray(params, dtype=self.dtype)))

    def _views(self, flat):
        """{block: [_Layer, ...]}: device views of a flat (P,) device vector (parameters or gradient)."""
        return {prefix: [_Layer(flat, off, fan_in, fan_out) for off, fan_in, fan_out in layers]
                for prefix, layers in self._blocks.items()}

    def _workspace(self, n, L) -> _StackBuffers:
        return cached_workspace(self._ws, (n, L), self.max_workspaces,
                                lambda: _StackBuffers(self.cuda, self.spec, self.dtype, n, L))

    def forward(self, params, x, eps):
        """NumpyBackend.forward with the parameters uploaded once for all of its blocks."""
        self._P = self._upload(params)
        try:
            return super().forward(params, x, eps)
        finally:
            self._P = None        # the block caches keep the layers they used

    # -- stage: an MLP block with a linear head (§2), on the device -----------------------------
    def _block_forward(self, params, prefix, h):
        """h: (R, I) -> out: (R, O) on the host. Layer t: h_t = f([h_{t-1} | 1] [W_t; b_t]).  §2.3

        oracle: NumpyBackend._block_forward (layers.mlp_forward, linear_forward).
        Cache: the device layers and buffers (valid until the next pass through this block)."""
        layers = (self._P if self._P is not None else self._upload(params))[prefix]
        h = np.ascontiguousarray(h, dtype=self.dtype)
        bufs = self._buffers(prefix, h.shape[0])
        bufs.inp.copy_to_device(h)
        a = bufs.inp
        for t, layer in enumerate(layers):                                   # (R, I_t) -> (R, O_t)
            self.dev._linear(a, layer, bufs.h[t], self.act if t < len(layers) - 1 else 0)
            a = bufs.h[t]
        return bufs.h[-1].copy_to_host(), (layers, bufs)

    def _block_backward(self, dout, cache):
        """dout: (R, O) -> dh: (R, I) and [(dW, db), ...] for the hidden layers and the head, on the
        host.   §2.1, §2.3   oracle: NumpyBackend._block_backward (layers.linear_backward, mlp_backward)."""
        layers, bufs = cache
        bufs.dout.copy_to_device(np.ascontiguousarray(dout, dtype=self.dtype).reshape(bufs.dout.shape))
        inputs = [bufs.inp] + bufs.h[:-1]                                    # layer t's input
        dy = bufs.dout
        for t in range(len(layers) - 1, -1, -1):
            # t > 0: the input is f(a_{t-1}), so the mask f'; t = 0: the block's input, no mask
            self.dev._linear_backward(inputs[t], layers[t], bufs.g[t], dy, bufs.dh[t],
                                      self.act if t > 0 else 0)
            dy = bufs.dh[t]
        grad = bufs.grad.copy_to_host()                                      # one copy back per block
        grads, off = [], 0
        for layer in layers:                                                 # [dW; db]: (I_t + 1, O_t)
            fan_in, fan_out = layer.W.shape
            Wb = grad[off:off + (fan_in + 1) * fan_out].reshape(fan_in + 1, fan_out)
            grads.append((Wb[:fan_in], Wb[fan_in]))
            off += (fan_in + 1) * fan_out
        return bufs.dh[0].copy_to_host(), grads


    # -- the whole pass on the device (kernels/cpu_stack.stack_step_'s stages)   §6, §11.3, §12 ------
    def _fwd(self, P, prefix, inp):
        """Block ``prefix`` on the device input inp (rows, I): its head (rows, O), a device buffer."""
        bufs = self._buffers(prefix, inp.shape[0])
        layers = P[prefix]
        a = inp
        for t, layer in enumerate(layers):                                   # (rows, I_t) -> (rows, O_t)
            self.dev._linear(a, layer, bufs.h[t], self.act if t < len(layers) - 1 else 0)
            a = bufs.h[t]
        return bufs.h[-1]

    def _bwd(self, P, G, prefix, inp, dout, dx):
        """Back through block ``prefix`` from its head's upstream dout: [dW; db] into the views G[prefix]
        and the input's gradient into dx (none when dx is None).   §2.3"""
        bufs = self._buffers(prefix, inp.shape[0])
        layers = P[prefix]
        inputs = [inp] + bufs.h[:-1]                                         # layer t's input
        dy = dout
        for t in range(len(layers) - 1, -1, -1):
            d = bufs.dh[t] if t > 0 else dx
            self.dev._linear_backward(inputs[t], layers[t], G[prefix][t], dy, d, self.act if t > 0 else 0)
            dy = d

    def _upload_batch(self, x, eps) -> _StackBuffers:
        """The (n, L) buffers with x (n, D) and eps (a sequence of S arrays (L, n, Z_l)) uploaded."""
        eps = self._eps_list(eps)
        ws = self._workspace(x.shape[0], eps[0].shape[0])
        ws.x.copy_to_device(np.ascontiguousarray(x, dtype=self.dtype))
        for s in range(self.S):
            ws.eps[s].copy_to_device(np.ascontiguousarray(eps[s], dtype=self.dtype))
        return ws

    def _pass(self, params, x, eps, objective, beta, estimator, want_grad):
        """One pass from host arrays: (loss, the device gradient (P,) or None, the buffers)."""
        ws = self._upload_batch(x, eps)
        dg = self.cuda.device_array(self.layout.size, dtype=self.dtype) if want_grad else None
        self.dev._take_loss()                                              # a zero accumulator
        self._forward_backward(self._upload(params), None if dg is None else self._views(dg), ws, beta,
                               objective, estimator=estimator)
        return self.dev._take_loss(), dg, ws

    def _forward_backward(self, P, Gr, ws, beta, objective, free_bits=0.0, states=None, kl_active=None,
                          estimator="reparam"):
        """Forward (F1-F6, G of §11.3), the objective (B1) and, when ``Gr`` (device views of the
        gradient) is not None, the backward (B2-B9), as cpu_stack.stack_step_, on the device
        buffers ws (x and eps uploaded); the loss is added to the accumulator ``dev._loss``. The
        signature of CudaBackend._forward_backward, which CudaTrainer drives; no free bits (S = 1
        only) and no eps drawn on the device (``states``) for a stack."""
        if free_bits > 0 or kl_active is not None:
            raise ValueError("free_bits applies to models with one stochastic layer only")
        if states is not None:
            raise ValueError("the cuda stack takes eps from the host (no device noise for a stack)")
        ck, dev = self.dev.ck, self.dev
        enc, dec = self.spec.enc_prefix, self.spec.dec_prefix
        S = self.S
        n, L = ws.n, ws.L
        R = L * n
        c = 1.0 / (n * L)
        iwae = objective == "iwae"
        dreg = estimator == "dreg"
        want_grad = Gr is not None
        run = dev._launch1

        # F1-F3: block enc{l} on z_{l-1} (x for l = 1), then the reparameterization
        heads = {}
        for s in range(S):
            heads[enc(s + 1)] = out = self._fwd(P, enc(s + 1), ws.x if s == 0 else ws.z[s - 1])
            run(ck.stack_gauss_fwd, R, out, ws.eps[s], ws.std[s], ws.z[s], int(s == 0))
        # G: block dec{l} on z_l gives [m | s] of p(z_{l-1}|z_l), l = 2..S;  F4-F6: dec, the likelihood
        for s in range(1, S):
            heads[dec(s + 1)] = self._fwd(P, dec(s + 1), ws.z[s])
        head = self._fwd(P, "dec", ws.z[0])
        G = self._buffers("dec", R).dout                                    # the head's score
        dev._likelihood(ws.x, head, G, ws.logw, 1.0 if iwae else -c, 0.0, grad=want_grad)

        # B1: log w (IWAE) or the ELBO's per-sample terms, in float64   §11.2
        for s in range(S - 1):
            run(ck.stack_gauss_logpdf_add, R, ws.z[s], heads[dec(s + 2)], ws.logw, beta, ws.u[s])
            run(ck.stack_logq_eps_add, R, ws.eps[s], heads[enc(s + 1)], int(s == 0), ws.logw, -beta)
        top = heads[enc(S)]
        if iwae:
            run(ck.stack_prior_add, R, ws.z[S - 1], ws.logw, beta)
            run(ck.stack_logq_eps_add, R, ws.eps[S - 1], top, int(S == 1), ws.logw, -beta)
            run(ck.iwae_weights, n, ws.logw.reshape(L, n), ws.zeros, 0.0, ws.dlogw.reshape(L, n), ws.bound,
                dev._loss, 1.0 / n)
        else:
            run(ck.stack_kl_add, R, top, ws.logw, -beta)
            run(ck.stack_elbo_bound, n, ws.logw, L, ws.bound, dev._loss)
        if not want_grad:
            return
        run(ck.stack_upstream, R, ws.dlogw, int(iwae), beta, c, ws.ap, ws.aq)
        if iwae:
            dev._launch2(ck.scale_rows, R, G.shape[1], G, ws.dlogw)             # B2: dll = dlogw

        # B3-B4: block dec, dz_1; each p(z_{l-1}|z_l) and block dec{l}, in increasing l; the prior
        self._bwd(P, Gr, "dec", ws.z[0], G, ws.dz[0])
        for s in range(1, S):
            dpm = self._buffers(dec(s + 1), R).dout
            run(ck.stack_gauss_logpdf_bwd, R, ws.ap, ws.z[s - 1], heads[dec(s + 1)], ws.u[s - 1], ws.dz[s - 1], dpm)
            self._bwd(P, Gr, dec(s + 1), ws.z[s], dpm, ws.dz[s])
        if iwae:
            run(ck.stack_prior_bwd, R, ws.ap, ws.z[S - 1], ws.dz[S - 1])
        if dreg:                                                              # §12
            run(ck.stack_dreg_factor, R, ws.dlogw, n, beta, ws.fac, ws.aq)
            for s in range(S):
                run(ck.stack_scale_rows_by, R, ws.dz[s], ws.fac)

        # B5-B8, top down: the Gaussian stage, then block enc{l}, whose input gradient joins dz_{l-1}
        for s in range(S - 1, -1, -1):
            out = heads[enc(s + 1)]
            bufs = self._buffers(enc(s + 1), out.shape[0])
            top_kl = (not iwae) and s == S - 1
            run(ck.stack_posterior_bwd, out.shape[0], ws.dz[s], ws.eps[s], ws.z[s], ws.std[s], out, bufs.dout,
                ws.sq[s], ws.aq, 0.0 if top_kl else 1.0, beta * c if top_kl else 0.0, int(dreg), int(s == 0))
            if s == 0:
                self._bwd(P, Gr, "enc", ws.x, bufs.dout, None)
            else:
                self._bwd(P, Gr, enc(s + 1), ws.z[s - 1], bufs.dout, None if dreg else ws.tmp[s - 1])
                if dreg:                                       # the input only, from the stopped upstream
                    self._bwd(P, {enc(s + 1): bufs.g}, enc(s + 1), ws.z[s - 1], ws.sq[s], ws.tmp[s - 1])
                run(ck.stack_add, R, ws.dz[s - 1], ws.tmp[s - 1])

    def loss_and_grad(self, params, x, eps, beta=1.0, objective="elbo", free_bits=0.0, grad=None,
                      kl_active=None, estimator="reparam"):
        """Batch mean of the negative bound and its gradient in the flat layout, on the device.
        §6, §11.3, §12"""
        require_estimator(self, estimator)
        if free_bits > 0 or kl_active is not None:
            raise ValueError("free_bits applies to models with one stochastic layer only")
        loss, dg, _ = self._pass(params, x, eps, objective, float(beta), estimator, True)
        return loss, grad_to_host(dg, grad, self.dtype)

    def bound(self, params, x, eps, objective="elbo", beta=1.0):
        """Per-example bound (n,) float64: the ELBO with the top KL analytic, or the IWAE bound.  §11.2"""
        _, _, ws = self._pass(params, x, eps, objective, float(beta), "reparam", False)
        return ws.bound.copy_to_host()


    # -- training on the device: CudaTrainer drives _forward_backward through these ------------------
    ck = property(lambda self: self.dev.ck)
    _launch1 = property(lambda self: self.dev._launch1)

    @property
    def _loss(self):
        return self.dev._loss

    @_loss.setter
    def _loss(self, acc):
        self.dev._loss = acc

    def _take_loss(self, acc=None):
        return self.dev._take_loss(acc)

    def make_trainer(self, params, optimizer, comm=None, objective="elbo", free_bits=0.0, loss_every=None,
                     estimator="reparam"):
        """A trainer that keeps the parameters, the gradient and the optimizer state on the device
        (CudaTrainer's update kernels); a step uploads x and eps and runs the pass of
        ``_forward_backward``; None for DReG (trainers.HostTrainer runs it).   §8, §9"""
        if estimator != "reparam":
            return None
        if free_bits > 0:
            raise ValueError("free_bits applies to models with one stochastic layer only")
        return CudaStackTrainer(self, params, optimizer, comm, objective, 0.0, 1, 0,
                                self.config.loss_every if loss_every is None else loss_every)


class CudaStackTrainer(CudaTrainer):
    """CudaTrainer for a stack: ``step(xb, eps, beta)`` with host eps (a sequence of S arrays
    (L, n, Z_l)); the parameters, gradient and optimizer state stay on the device between steps; the
    loss comes back every ``loss_every`` steps. No device noise, no attach_data/step_indices (yet)."""

    def step(self, xb, eps=None, beta=1.0, weight=None):
        be = self.backend
        if eps is None:
            raise ValueError("the cuda stack trainer takes eps from the host: step(xb, eps, beta)")
        xb = np.ascontiguousarray(xb, dtype=be.dtype)
        if xb.shape[0] == 0:                             # an empty share of a tiny last batch
            return self._step(None, beta, None, weight)
        return self._step(be._upload_batch(xb, eps), beta, None, weight)

    def step_indices(self, idx, beta=1.0, weight=None):
        raise ValueError("the cuda stack trainer takes host minibatches and eps: use step(xb, eps, beta)")


def recording_stack_backend(spec, dtype, config=None):
    """A CudaStackBackend whose launches are recorded, not run (see cuda.recording_backend): no GPU
    needed; ``recorded`` maps (kernel, argument types) to (grid, block) for the compile test."""
    be = CudaStackBackend.__new__(CudaStackBackend)
    be._setup(spec, dtype, recording_backend(spec, dtype, config))
    be.recorded = be.dev.recorded
    return be
