"""The cuda backend for stacks of S > 1 stochastic layers (docs/math.md §11): a first, unfused version.

It mirrors kernels/cpu_stack.py: the NumPy reference's composition (kernels/numpy_.py: the same
forward, the same backward, the same Gaussian stage, likelihood and objective, in the same order)
with its most expensive stage, the MLP block (§2), run by the numba.cuda kernels of the one-layer
backend (kernels/cuda.py, kernels/cuda_kernels.py). Per block, stage by stage:

    _block_forward   per layer t: a_t = [h_{t-1} | 1] [W_t; b_t], h_t = f(a_t) (identity for the head)
                     CudaBackend._linear: one GEMM with the EPI_ACT epilogue (fused), or a GEMM and
                     ``bias_act`` (unfused).   oracle: layers.linear_forward / layers.mlp_forward
    _block_backward  per layer t, top down: [dW_t; db_t] = [h_{t-1} | 1]^T g_t, one GEMM (fused), or a
                     GEMM and ``bias_grad`` (unfused); g_{t-1} = (g_t W_t^T) * f'(h_{t-1}), one GEMM with
                     the EPI_DMASK epilogue (fused) or a GEMM and ``act_backward``; the block's input
                     gradient g_0 W_0^T without a mask.   oracle: layers.linear_backward / mlp_backward

Each block's device buffers are preallocated once per (block, rows) and named (:class:`_BlockBuffers`:
the input, every layer's output, the upstream gradient, every layer input's gradient, the block's
[W; b] gradient); the parameters are uploaded once per pass. The oracle of the whole backend is
``NumpyBackend`` (tests/cuda_sim/sim_stack.py, under the simulator).

Not done here (what the fused one-layer backend has): the Gaussian stage (reparameterization, log N,
the top KL), the likelihood and the objective on the device (they run in NumPy on the host, between the
blocks, so every block's input and output crosses the bus once per pass), and a device-resident trainer
(training goes through trainers.HostTrainer).
"""
from __future__ import annotations

import numpy as np

from .cuda import CudaBackend, _Layer, recording_backend, unavailable_reason
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


class CudaStackBackend(NumpyBackend):
    """NumpyBackend with the MLP blocks in numba.cuda kernels; built through ``kernels.stack_class``
    for backend 'cuda' and S > 1. Host arrays in and out, as every backend."""
    name = "cuda"
    estimators = ("reparam", "dreg")   # NumpyBackend's composition; score is for one stochastic layer
    max_buffers = 32          # (block, rows) buffer sets kept; the least recently used is dropped

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
        flat = self.cuda.to_device(np.ascontiguousarray(params, dtype=self.dtype))
        return {prefix: [_Layer(flat, off, fan_in, fan_out) for off, fan_in, fan_out in layers]
                for prefix, layers in self._blocks.items()}

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


def recording_stack_backend(spec, dtype, config=None):
    """A CudaStackBackend whose launches are recorded, not run (see cuda.recording_backend): no GPU
    needed; ``recorded`` maps (kernel, argument types) to (grid, block) for the compile test."""
    be = CudaStackBackend.__new__(CudaStackBackend)
    be._setup(spec, dtype, recording_backend(spec, dtype, config))
    be.recorded = be.dev.recorded
    return be
