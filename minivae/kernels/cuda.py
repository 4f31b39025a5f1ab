"""The GPU backend: numba.cuda kernels driven from the host (docs/math.md §9).

:class:`CudaBackend` has the interface of the NumPy reference (``encode``, ``decode``, ``bound``,
``loss_and_grad``), taking and returning host arrays; the kernels are in kernels/cuda_kernels.py.
:meth:`CudaBackend.make_trainer` returns a :class:`CudaTrainer`, which keeps the parameters, the
optimizer state, the workspaces and (optionally) the dataset on the device, so that a training step
moves nothing but the minibatch (or its indices) and, every ``loss_every`` steps, one loss scalar.

Without a usable GPU, ``CudaBackend(...)`` raises RuntimeError with a one-line message naming the
cause (numba.cuda not importable, no CUDA driver, no device); it never falls back to the CPU. With
``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported, it runs on numba's CUDA simulator (that is
how CI tests it: tests/cuda_sim).

One pass (fused, the default), for a model with one hidden layer each side:
    enc.0   [x|1] [W;b] -> relu            1 GEMM (bias and activation in the epilogue)
    enc.head                               1 GEMM -> out = [mu | logvar]
    reparam_kl                             1      z, KL, log p(z) - log q(z|x), eps drawn here
    dec.0, dec.head                        2 GEMMs
    likelihood                             1      log p(x|z) per row (block sum), dL/dhead, loss
    (IWAE: iwae_weights, scale_rows        2)
    backward: per layer [dW;db] = [x|1]^T dY and dX = (dY W^T) * f'(x)    2 GEMMs (1 for enc.0)
    posterior_backward                     1      KL gradient, free bits, into [dmu | dlogvar]
    optimizer                              1
so an ELBO training step is 15 launches (16 with the on-device minibatch gather); each extra hidden
layer adds 3 per side. ``CudaBackend.launches`` counts them and ``CudaTrainer.launches_per_step``
reports the last step's count.

How a training loop drives the trainer (minivae/train.py does the first form):

    trainer = model.backend.make_trainer(model.params, optimizer, comm, objective, free_bits)
    for each step:
        loss = trainer.step(xb, eps, beta)        # host minibatch and host eps (L, n, Z): the run's
                                                  # random numbers are the CPU backends' ones
        if loss is not None: ...                  # the mean loss of the last N steps, else None
    loss = trainer.flush_loss()                   # end of epoch: the steps not yet reported
    trainer.sync_params()                         # before evaluating, checkpointing, reading params

The fully device-resident form moves only row numbers (n int64) per step; its eps come from the
device's xoroshiro128p streams, so its random numbers differ from a CPU run's:

    trainer = model.backend.make_trainer(model.params, optimizer, comm, objective, free_bits,
                                         samples=L, seed=seed, loss_every=N)
    trainer.attach_data(x_train)                  # once: the dataset goes to the device
    loss = trainer.step_indices(idx, beta)        # per step; step(xb, None, beta) draws eps there too

``sync_params`` copies the parameters into ``model.params`` and the optimizer state into
``optimizer.state[...]`` (in place); ``optimizer.t`` is kept on the host by the trainer. After
changing ``model.params`` or the optimizer state on the host (e.g. resuming from a checkpoint),
call ``trainer.push_params()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .. import distributions as dist
from . import require_one_stochastic_layer
from .interface import require_estimator
from .. import objectives as obj


@dataclass
class CudaConfig:
    """Launch configuration. Tests set odd tile sizes to exercise every boundary guard."""
    gemm: int = 2            # GEMM variant: 1 = shared-memory tile, 2 = 2-D register tiling
    tile: int = 16           # T: GEMM blocks are T x T threads (also the 2-D elementwise blocks)
    reg: int = 4             # R: with gemm=2 each thread computes an R x R patch; a block a (T R)^2 tile
    block: int = 128         # threads per block of the 1-D kernels and of the block reductions
    fuse: bool = True        # bias, activation and its backward mask inside the GEMMs (fewer launches)
    loss_every: int = 50     # the trainer brings the loss back every this many steps
    max_rows: int = 1 << 16  # decoder rows per chunk in bound() (importance sampling with large k)

    def check(self):
        for name in ("tile", "reg", "block", "loss_every", "max_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CudaConfig.{name} must be a positive integer, got {v!r}")
        if self.gemm not in (1, 2):
            raise ValueError(f"CudaConfig.gemm must be 1 or 2, got {self.gemm!r}")
        if self.tile * self.tile > 1024:
            raise ValueError(f"CudaConfig.tile must be at most 32 (a block holds 1024 threads), got {self.tile}")
        if self.block > 1024:
            raise ValueError(f"CudaConfig.block must be at most 1024, got {self.block}")
        return self


CONFIG = CudaConfig()   # the default for new backends; CudaBackend(spec, dtype, config=...) overrides


def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def unavailable_reason():
    """None when numba.cuda can run kernels here (a GPU, or the simulator); else the cause, one line."""
    try:
        from numba import cuda
    except Exception as e:  # ImportError, or a numba / numba-cuda version clash raising anything
        return (f"numba.cuda cannot be imported ({type(e).__name__}: {_one_line(e)}); install the "
                f"GPU extra with a numba-cuda release that matches the installed numba (pip install -e '.[cuda]')")
    try:
        if cuda.is_available():
            return None
    except Exception:  # noqa: BLE001 - diagnosed below
        pass
    try:
        from numba.cuda.cudadrv.driver import driver
        count = driver.get_device_count()
    except Exception as e:  # CudaSupportError: the driver library is missing or cuInit failed
        msg = _one_line(e)
        if "cannot be found" in msg or "not found" in msg:
            return ("no CUDA driver: the NVIDIA driver library (libcuda) cannot be found "
                    "(install the driver, or set NUMBA_CUDA_DRIVER to its path)")
        if "NO_DEVICE" in msg:
            return "no CUDA device: the driver is installed but finds no GPU"
        return f"the CUDA driver failed to initialise ({msg})"
    if count == 0:
        return "no CUDA device: the driver is installed but finds no GPU"
    return ("the CUDA device cannot be used by numba (numba.cuda.is_available() is false; "
            "`numba -s` shows why, e.g. an unsupported compute capability)")


def select_local_device(local_rank):
    """Bind this process to GPU ``local_rank`` mod (the GPUs it sees), before its first CUDA context:
    data-parallel ranks on one node take the node's GPUs in turn instead of all landing on device 0.
    With CUDA_VISIBLE_DEVICES set to one GPU per rank (as some schedulers do), that one is device 0.
    Returns the device id, or None when CUDA is unusable here (building the backend then says why)."""
    if unavailable_reason() is not None:
        return None
    from numba import cuda
    device = int(local_rank) % max(1, len(cuda.gpus))
    cuda.select_device(device)
    return device


def grad_to_host(dg, grad, dtype):
    """The device gradient ``dg`` into the caller's ``grad`` (a new array when None), straight when its
    layout allows."""
    if grad is None:
        grad = np.empty(dg.shape, dtype=dtype)
    if grad.flags.c_contiguous and grad.dtype == dtype:
        dg.copy_to_host(grad)
    else:
        grad[...] = dg.copy_to_host()
    return grad


class _Layer:
    """Device views of one linear layer in a flat vector: Wb = [W; b] (I+1, O), W (I, O), b (O,)."""
    __slots__ = ("Wb", "W", "b")

    def __init__(self, flat, offset, fan_in, fan_out):
        self.Wb = flat[offset:offset + (fan_in + 1) * fan_out].reshape(fan_in + 1, fan_out)
        self.W = flat[offset:offset + fan_in * fan_out].reshape(fan_in, fan_out)
        self.b = flat[offset + fan_in * fan_out:offset + (fan_in + 1) * fan_out]


class _Workspace:
    """Every intermediate of one pass for n examples and L samples (R = L n rows), preallocated."""

    def __init__(self, cuda, spec, dtype, n, L):
        def e(*shape):
            return cuda.device_array(shape, dtype=dtype)
        R, Z, K, D = L * n, spec.z_dim, spec.head_width, spec.x_dim
        self.n, self.L = n, L
        self.x = e(n, D)                                  # the minibatch
        self.h_enc = [e(n, h) for h in spec.hidden]       # encoder hidden outputs h = f(a)
        self.out = e(n, 2 * Z)                            # [mu | logvar]
        self.eps = e(L, n, Z)
        self.z = e(R, Z)
        self.kl = e(n, Z)                                 # KL per example and dim
        self.logr = e(R)                                  # log p(z) - log q(z|x) per row
        self.h_dec = [e(R, h) for h in spec.dec_hidden]
        self.head = e(R, K)
        self.G = e(R, K)                                  # dL/dhead
        self.ll = e(R)                                    # log p(x|z) per row
        self.dlw = e(L, n)                                # IWAE: dL/dlog w
        self.bound = e(n)
        self.dh_dec = [e(R, h) for h in spec.dec_hidden]
        self.dz = e(R, Z)
        self.dout = e(n, 2 * Z)                           # [dmu | dlogvar]
        self.dh_enc = [e(n, h) for h in spec.hidden]
        self.ll2 = self.ll.reshape(L, n)
        self.logr2 = self.logr.reshape(L, n)
        self.dlw_rows = self.dlw.reshape(R)


class CudaBackend:
    """numba.cuda backend with the NumpyBackend interface (host arrays in and out).   §9"""
    name = "cuda"
    estimators = ("reparam",)      # the fused pass; score and DReG of one layer: numpy (and numba)
    max_workspaces = 4

    def __init__(self, spec, dtype, config=None):
        require_one_stochastic_layer("cuda", spec)
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend 'cuda' is unavailable: {reason}")
        from numba import cuda
        from numba.cuda.random import create_xoroshiro128p_states
        self._setup(spec, dtype, config, cuda, create_xoroshiro128p_states)

    def _setup(self, spec, dtype, config, cuda, create_states):
        """Everything but the availability check. ``cuda`` is the numba.cuda module; a test passes a
        stand-in that allocates host arrays, to type-check every launch without a GPU."""
        from . import cuda_kernels as ck
        self.cuda, self.ck = cuda, ck
        self._create_states = create_states
        self.spec = spec
        self.layout = spec.layout
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"backend 'cuda' computes in float32 or float64, got {self.dtype}")
        self.config = replace(config if config is not None else CONFIG).check()
        self.act = ck.ACT_CODE[spec.activation]
        self.lik = ck.LIK_CODE[spec.likelihood]
        self._log_floor = math.log(spec.var_floor)               # gaussian: var = var_floor + e^s
        self._cb_switch = dist._cb_switch(np.zeros(1, self.dtype))   # continuous Bernoulli Taylor switch
        self.launches = 0                                 # kernel launches since construction
        self._ws = {}
        self._loss = cuda.to_device(np.zeros(1, np.float64))    # loss accumulator (atomic adds)
        self._zero = np.zeros(1, np.float64)
        self._no_states = create_states(1, seed=0)     # placeholder when eps is given
        self._no_active = cuda.to_device(np.zeros(1, np.float64))   # placeholder when kl_active is not
        for prefix, fan_in, fan_out in self.layout.layers:       # [W; b] is one (I+1, O) block (§1)
            w, b = self.layout.slots[prefix + ".W"], self.layout.slots[prefix + ".b"]
            assert b.offset == w.offset + fan_in * fan_out

    # -- launches ------------------------------------------------------------------------------
    def _launch(self, kernel, grid, block, *args):
        self.launches += 1
        kernel[grid, block](*args)

    def _launch1(self, kernel, size, *args):
        """1-D launch, one thread per item."""
        B = self.config.block
        self._launch(kernel, (max(1, -(-size // B)),), (B,), *args)

    def _launch2(self, kernel, rows, cols, *args):
        """2-D launch over a (rows, cols) array, thread x on columns."""
        T = self.config.tile
        self._launch(kernel, (max(1, -(-cols // T)), max(1, -(-rows // T))), (T, T), *args)

    def gemm(self, A, B, C, trans_a=False, trans_b=False, ones_a=False, epi=0, act=0, H=None):
        """C = op(A) @ op(B) with an epilogue (cuda_kernels: EPI_STORE, EPI_ACT, EPI_DMASK).   §2.1

        ``ones_a`` appends a column of ones to the stored A (the bias trick, see cuda_kernels)."""
        M, N = C.shape
        one = int(bool(ones_a))
        Ma, Ka = (A.shape[1] + one, A.shape[0]) if trans_a else (A.shape[0], A.shape[1] + one)
        Kb, Nb = (B.shape[1], B.shape[0]) if trans_b else (B.shape[0], B.shape[1])
        if (Ma, Nb) != (M, N) or Ka != Kb:
            raise ValueError(f"gemm: op(A) is ({Ma}, {Ka}), op(B) is ({Kb}, {Nb}), C is ({M}, {N})")
        cfg = self.config
        kernel, edge = self.ck.gemm_kernel(cfg.gemm, cfg.tile, cfg.reg, self.dtype.name,
                                           bool(trans_a), bool(trans_b), bool(ones_a))
        grid = (max(1, -(-N // edge)), max(1, -(-M // edge)))
        self._launch(kernel, grid, (cfg.tile, cfg.tile), A, B, C, M, N, Ka, epi, act,
                     C if H is None else H)

    # -- device buffers ------------------------------------------------------------------------
    def _workspace(self, n, L) -> _Workspace:
        ws = self._ws.pop((n, L), None)
        if ws is None:
            if len(self._ws) >= self.max_workspaces:
                self._ws.pop(next(iter(self._ws)))           # the least recently used
            ws = _Workspace(self.cuda, self.spec, self.dtype, n, L)
        self._ws[(n, L)] = ws
        return ws

    def _views(self, flat):
        """{"enc": [_Layer...], "dec": [...]} over a flat device vector (params or grad)."""
        views = {"enc": [], "dec": []}
        for prefix, fan_in, fan_out in self.layout.layers:
            off = self.layout.slots[prefix + ".W"].offset
            views[prefix.split(".")[0]].append(_Layer(flat, off, fan_in, fan_out))
        return views

    def _take_loss(self, acc=None):
        """The accumulated loss (one float back to the host), and the accumulator reset."""
        acc = self._loss if acc is None else acc
        v = float(acc.copy_to_host()[0])
        acc.copy_to_device(self._zero)
        return v

    # -- layers ----------------------------------------------------------------------------------
    def _linear(self, x, layer, out, act):
        """out = f([x | 1] [W; b]) (fused) or GEMM then bias_act.   §2.1-§2.2"""
        ck = self.ck
        if self.config.fuse:
            self.gemm(x, layer.Wb, out, ones_a=True, epi=ck.EPI_ACT if act else ck.EPI_STORE, act=act)
        else:
            self.gemm(x, layer.W, out)
            self._launch2(ck.bias_act, out.shape[0], out.shape[1], out, layer.b, out, act)

    def _linear_backward(self, x, layer, glayer, dy, dx, act_in):
        """[dW; db] = [x | 1]^T dy into the gradient views; dx = (dy W^T) * f'(x) when x is an
        activation output (act_in), dy W^T when not, nothing when dx is None.   §2.1, §2.3"""
        ck = self.ck
        if self.config.fuse:
            self.gemm(x, dy, glayer.Wb, trans_a=True, ones_a=True)
        else:
            self.gemm(x, dy, glayer.W, trans_a=True)
            T = self.config.tile
            kernel = ck.bias_grad_kernel(T, self.dtype.name)
            self._launch(kernel, (max(1, -(-dy.shape[1] // T)),), (T, T), dy, glayer.b)
        if dx is None:
            return
        if act_in and self.config.fuse:
            self.gemm(dy, layer.W, dx, trans_b=True, epi=ck.EPI_DMASK, act=act_in, H=x)
        else:
            self.gemm(dy, layer.W, dx, trans_b=True)
            if act_in:
                self._launch2(ck.act_backward, dx.shape[0], dx.shape[1], dx, x, act_in, dx)

    def _encoder(self, P, x, h_bufs, out):
        h = x
        for layer, buf in zip(P["enc"][:-1], h_bufs):
            self._linear(h, layer, buf, self.act)
            h = buf
        self._linear(h, P["enc"][-1], out, 0)

    def _decoder(self, P, z, h_bufs, head):
        h = z
        for layer, buf in zip(P["dec"][:-1], h_bufs):
            self._linear(h, layer, buf, self.act)
            h = buf
        self._linear(h, P["dec"][-1], head, 0)

    # -- one pass ----------------------------------------------------------------------------------
    def _reparam(self, out, eps, z, kl, logr, states):
        L, n = eps.shape[0], eps.shape[1]
        draw = states is not None
        self._launch1(self.ck.reparam_kl, L * n, out, eps, z, kl, logr,
                      states if draw else self._no_states, int(draw), int(self.dtype == np.float64))

    def _likelihood(self, x, head, G, ll, scale, loss_w, grad=True):
        like, _ = self.ck.rowsum_kernels(self.config.block, self.dtype.name)
        self._launch(like, (head.shape[0],), (self.config.block,), x, head, G, ll, self.lik,
                     self._log_floor, self._cb_switch, scale, int(grad), self._loss, loss_w)

    def _forward_backward(self, P, Gr, ws, beta, objective, free_bits, states=None, kl_active=None):
        """The whole pass of §6 on device buffers: the loss is added to the accumulator, the
        gradient written into the views Gr. ws.x holds the batch; ws.eps the noise unless drawn.
        ``kl_active``: None, or a (Z,) float64 device array, the free-bits decision (§5.3, §10)."""
        ck = self.ck
        n, L = ws.n, ws.L
        iwae = objective == "iwae"
        self._encoder(P, ws.x, ws.h_enc, ws.out)
        self._reparam(ws.out, ws.eps, ws.z, ws.kl, ws.logr, states)
        self._decoder(P, ws.z, ws.h_dec, ws.head)
        if iwae:
            self._likelihood(ws.x, ws.head, ws.G, ws.ll, 1.0, 0.0)
            self._launch1(ck.iwae_weights, n, ws.ll2, ws.logr2, beta, ws.dlw, ws.bound, self._loss, 1.0 / n)
            self._launch2(ck.scale_rows, ws.G.shape[0], ws.G.shape[1], ws.G, ws.dlw_rows)
        else:
            w = -1.0 / (n * L)                            # dL/dll for every row   §5.1
            self._likelihood(ws.x, ws.head, ws.G, ws.ll, w, w)

        # decoder backward: inputs z, h_dec[0], ...; the last input's gradient is dz
        inputs = [ws.z] + ws.h_dec
        dy = ws.G
        for k in reversed(range(len(P["dec"]))):
            dx = ws.dh_dec[k - 1] if k > 0 else ws.dz
            self._linear_backward(inputs[k], P["dec"][k], Gr["dec"][k], dy, dx, self.act if k > 0 else 0)
            dy = dx
        _, post = ck.rowsum_kernels(self.config.block, self.dtype.name)
        self._launch(post, (self.spec.z_dim,), (self.config.block,), ws.out, ws.eps, ws.z, ws.dz,
                     ws.kl, ws.dlw, ws.dout, beta, free_bits,
                     self._no_active if kl_active is None else kl_active, int(kl_active is not None),
                     int(iwae), self._loss)
        inputs = [ws.x] + ws.h_enc
        dy = ws.dout
        for k in reversed(range(len(P["enc"]))):
            dx = ws.dh_enc[k - 1] if k > 0 else None
            self._linear_backward(inputs[k], P["enc"][k], Gr["enc"][k], dy, dx, self.act)
            dy = dx

    # -- the public interface (host arrays) --------------------------------------------------------
    def encode(self, params, x):
        """x: (n, D) -> mu, logvar: (n, Z)."""
        ws = self._workspace(x.shape[0], 1)
        ws.x.copy_to_device(np.ascontiguousarray(x, dtype=self.dtype))
        self._encoder(self._views(self.cuda.to_device(params)), ws.x, ws.h_enc, ws.out)
        out = ws.out.copy_to_host()
        Z = self.spec.z_dim
        return out[:, :Z], out[:, Z:]

    def decode(self, params, z):
        """z: (m, Z) -> head: (m, K)."""
        ws = self._workspace(z.shape[0], 1)
        ws.z.copy_to_device(np.ascontiguousarray(z, dtype=self.dtype))
        self._decoder(self._views(self.cuda.to_device(params)), ws.z, ws.h_dec, ws.head)
        return ws.head.copy_to_host()

    def bound(self, params, x, eps, objective="elbo", beta=1.0):
        """Per-example bound (n,). The L (or k) samples go through the decoder in chunks of at most
        ``config.max_rows`` rows, so importance sampling with k = 5000 fits in memory.   §5, §7"""
        cuda, ck = self.cuda, self.ck
        L, n, _ = eps.shape
        Lc = max(1, min(L, self.config.max_rows // n))
        ws = self._workspace(n, Lc)
        P = self._views(cuda.to_device(params))
        ws.x.copy_to_device(np.ascontiguousarray(x, dtype=self.dtype))
        eps_d = cuda.to_device(np.ascontiguousarray(eps, dtype=self.dtype))
        ll = cuda.device_array(L * n, dtype=self.dtype)
        logr = cuda.device_array(L * n, dtype=self.dtype)
        self._encoder(P, ws.x, ws.h_enc, ws.out)
        for l0 in range(0, L, Lc):
            l1 = min(L, l0 + Lc)
            rows = (l1 - l0) * n
            z = ws.z[:rows]
            self._reparam(ws.out, eps_d[l0:l1], z, ws.kl, logr[l0 * n:l1 * n], None)
            hd = [h[:rows] for h in ws.h_dec]
            self._decoder(P, z, hd, ws.head[:rows])
            self._likelihood(ws.x, ws.head[:rows], ws.G[:rows], ll[l0 * n:l1 * n], 1.0, 0.0, grad=False)
        if objective == "elbo":
            return obj.elbo_per_example(ll.copy_to_host().reshape(L, n), ws.kl.copy_to_host(), beta)
        dlw = cuda.device_array((L, n), dtype=self.dtype)
        scratch = cuda.to_device(np.zeros(1, np.float64))
        self._launch1(ck.iwae_weights, n, ll.reshape(L, n), logr.reshape(L, n), beta, dlw, ws.bound,
                      scratch, 1.0 / n)
        return ws.bound.copy_to_host()

    def loss_and_grad(self, params, x, eps, beta=1.0, objective="elbo", free_bits=0.0, grad=None,
                      kl_active=None, estimator="reparam"):
        """Batch mean of the negative bound and its gradient in the flat layout (host arrays).   §6
        ``kl_active`` (Z,): the free-bits decision taken on a larger batch (objectives.elbo_loss);
        ``estimator``: "reparam" only (``estimators``; interface.require_estimator names the others)."""
        require_estimator(self, estimator)
        cuda = self.cuda
        L, n, _ = eps.shape
        active = None
        if kl_active is not None:
            active = np.ascontiguousarray(kl_active, dtype=np.float64)
            if active.shape != (self.spec.z_dim,):
                raise ValueError(f"kl_active must have shape ({self.spec.z_dim},), got {active.shape}")
            active = cuda.to_device(active)
        ws = self._workspace(n, L)
        ws.x.copy_to_device(np.ascontiguousarray(x, dtype=self.dtype))
        ws.eps.copy_to_device(np.ascontiguousarray(eps, dtype=self.dtype))
        dg = cuda.device_array(self.layout.size, dtype=self.dtype)
        self._take_loss()                                  # start from a zero accumulator
        self._forward_backward(self._views(cuda.to_device(params)), self._views(dg), ws,
                               float(beta), objective, float(free_bits), kl_active=active)
        loss = self._take_loss()
        return loss, grad_to_host(dg, grad, self.dtype)

    # -- training on the device ----------------------------------------------------------------
    def make_trainer(self, params, optimizer, comm=None, objective="elbo", free_bits=0.0, samples=1,
                     seed=0, loss_every=None, estimator="reparam"):
        """A device-resident training step (see the module docstring for how to drive it); None for an
        estimator other than reparam (trainers.HostTrainer runs it)."""
        if estimator != "reparam":
            return None
        return CudaTrainer(self, params, optimizer, comm, objective, free_bits, samples, seed,
                           self.config.loss_every if loss_every is None else loss_every)


class _HostDeviceArray(np.ndarray):
    """Host memory standing in for a device array (the two methods the backend calls on one)."""

    def copy_to_host(self, ary=None):
        if ary is None:
            return np.array(self)
        ary[...] = self
        return ary

    def copy_to_device(self, ary):
        self[...] = ary


class _HostDevice:
    """The part of numba.cuda the host code uses, allocating host memory."""

    @staticmethod
    def to_device(a):
        return np.array(a).view(_HostDeviceArray)

    @staticmethod
    def device_array(shape, dtype=np.float64):
        return np.zeros(shape, dtype).view(_HostDeviceArray)


def _host_states(n, seed=0, subsequence_start=0):
    from numba.cuda.random import xoroshiro128p_dtype
    return np.zeros(n, xoroshiro128p_dtype).view(_HostDeviceArray)


def recording_backend(spec, dtype, config=None):
    """A CudaBackend that runs its host code on host memory and records its launches instead of
    running them: ``recorded`` maps (kernel, argument types) to (grid, block). No GPU needed; the
    tests compile every recorded launch with numba's CUDA pipeline, and benchmarks/gpu.py
    --resources asks ptxas for each kernel's registers and shared memory. The numbers it computes
    are meaningless (nothing runs); only the launches count."""
    import numba
    be = CudaBackend.__new__(CudaBackend)
    be._setup(spec, dtype, config, _HostDevice, _host_states)
    be.recorded = {}

    def launch(kernel, grid, block, *args):
        be.launches += 1
        be.recorded.setdefault((kernel, tuple(numba.typeof(a) for a in args)), (grid, block))

    be._launch = launch
    return be


class CudaTrainer:
    """Parameters, optimizer state, workspaces and (after attach_data) the dataset on the device.

    A step uploads only the minibatch (``step``) or its row numbers (``step_indices``), runs the
    forward, backward and optimizer kernels, and returns the mean loss of the last ``loss_every``
    steps every ``loss_every`` steps (None otherwise): the only copy back to the host.   §8, §9
    """

    def __init__(self, backend, params, optimizer, comm=None, objective="elbo", free_bits=0.0,
                 samples=1, seed=0, loss_every=50):
        obj.check_objective(objective)
        if free_bits > 0 and objective != "elbo":
            raise ValueError("free_bits applies to the ELBO objective only")
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if isinstance(loss_every, bool) or not isinstance(loss_every, (int, np.integer)) or loss_every < 1:
            raise ValueError(f"loss_every must be a positive integer, got {loss_every!r}")
        if optimizer.name not in ("sgd", "adagrad", "adam"):
            raise ValueError(f"the cuda trainer has no update kernel for optimizer {optimizer.name!r}")
        if params.shape != (backend.layout.size,) or params.dtype != backend.dtype:
            raise ValueError(f"params must be a ({backend.layout.size},) {backend.dtype} vector, "
                             f"got {params.shape} {params.dtype}")
        cuda = backend.cuda
        self.backend, self.cuda = backend, cuda
        self.params, self.optimizer, self.comm = params, optimizer, comm
        self.objective, self.free_bits, self.samples = objective, float(free_bits), int(samples)
        self.seed, self.loss_every = seed, int(loss_every)
        self.error = None            # the exception of this rank's last step (data-parallel only)
        self.dp = cuda.to_device(params)                           # (P,) parameters
        self.dg = cuda.device_array(params.shape, dtype=params.dtype)   # (P,) gradient
        self.dstate = {k: cuda.to_device(v) for k, v in optimizer.state.items()}
        self.P = backend._views(self.dp)
        self.Gr = backend._views(self.dg)
        self.loss_acc = cuda.to_device(np.zeros(1, np.float64))   # summed loss since the last report
        self.pending = 0                                           # steps summed in loss_acc
        self.steps = 0
        self.launches_per_step = 0
        self.X = None                                              # the dataset, after attach_data
        self._states = None
        self._idx = {}
        self._g_host = None
        self._kl_active = None                                     # (Z,) device: free bits over ranks

    # -- data on the device ---------------------------------------------------------------------
    def attach_data(self, x_train):
        """Copy the whole training set (N, D) to the device once; then use step_indices."""
        x = np.ascontiguousarray(x_train, dtype=self.backend.dtype)
        if x.ndim != 2 or x.shape[1] != self.backend.spec.x_dim:
            raise ValueError(f"x_train must be (N, {self.backend.spec.x_dim}), got shape {x.shape}")
        self.X = self.cuda.to_device(x)

    def _rng(self, rows):
        """One xoroshiro128p state per reparameterization thread (per decoder row). A larger batch
        keeps the running states and adds fresh streams after them (subsequences have, rows, ...),
        so no stream restarts and no noise repeats."""
        have = 0 if self._states is None else self._states.shape[0]
        if have < rows:
            fresh = self.backend._create_states(rows - have, seed=self.seed, subsequence_start=have)
            if have:                                   # rare: a round trip through the host
                fresh = self.cuda.to_device(np.concatenate([self._states.copy_to_host(),
                                                            fresh.copy_to_host()]))
            self._states = fresh
        return self._states

    # -- steps -------------------------------------------------------------------------------------
    def step(self, xb, eps=None, beta=1.0, weight=None):
        """One step on a host minibatch xb (n, D); eps (L, n, Z) from the host, or None to draw it on
        the device. Returns the mean loss of the last ``loss_every`` steps, or None. ``weight``: this
        rank's row count when data-parallel ranks hold unequal shares (passed to the all-reduce)."""
        be = self.backend
        xb = np.ascontiguousarray(xb, dtype=be.dtype)
        n = xb.shape[0]
        if n == 0:                                       # an empty share of a tiny last batch
            return self._step(None, beta, None, weight)
        L = self.samples if eps is None else eps.shape[0]
        ws = be._workspace(n, L)
        ws.x.copy_to_device(xb)
        if eps is not None:
            ws.eps.copy_to_device(np.ascontiguousarray(eps, dtype=be.dtype))
        return self._step(ws, beta, None if eps is not None else self._rng(L * n), weight)

    def step_indices(self, idx, beta=1.0, weight=None):
        """One step on rows ``idx`` of the attached dataset, eps drawn on the device."""
        if self.X is None:
            raise RuntimeError("step_indices needs the dataset on the device: call attach_data(x_train) first")
        be = self.backend
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        n = idx.shape[0]
        ws = be._workspace(n, self.samples)
        d_idx = self._idx.get(n)
        if d_idx is None:
            d_idx = self._idx[n] = self.cuda.device_array(n, dtype=np.int64)
        d_idx.copy_to_device(idx)                        # the only upload: n row numbers
        start = be.launches
        be._launch2(be.ck.gather_rows, n, ws.x.shape[1], self.X, d_idx, ws.x)
        loss = self._step(ws, beta, self._rng(self.samples * n), weight)
        self.launches_per_step = be.launches - start      # the gather included
        return loss

    def _step(self, ws, beta, states, weight=None):
        be = self.backend
        start = be.launches
        distributed = self.comm is not None and getattr(self.comm, "size", 1) > 1
        if self._g_host is None and (distributed or ws is None):
            self._g_host = np.zeros(self.dg.shape, dtype=self.dg.dtype)
        self.error = None
        active = self._kl_active_over_ranks(ws) if distributed and self.free_bits > 0 else None
        if ws is None:
            self._g_host[...] = 0                        # no rows: a zero gradient, no loss
            self.dg.copy_to_device(self._g_host)
        elif self.error is None:
            saved, be._loss = be._loss, self.loss_acc    # accumulate this trainer's losses
            try:
                be._forward_backward(self.P, self.Gr, ws, float(beta), self.objective, self.free_bits, states,
                                     kl_active=active)
            except Exception as e:
                # with other ranks waiting in the all-reduce, keep the exception and join it with a
                # NaN gradient: the training loop reads ``error`` and stops every rank (as HostTrainer)
                if not distributed:
                    raise
                self.error = e
            finally:
                be._loss = saved
        if distributed:
            # data parallel over MPI: the gradient makes a host round trip for the all-reduce
            if self.error is None:
                self.dg.copy_to_host(self._g_host)
            else:
                self._g_host[...] = np.nan
            self.comm.allreduce_mean_(self._g_host, weight)
            self.dg.copy_to_device(self._g_host)
        self._update()
        self.steps += 1
        self.pending += 1
        self.launches_per_step = be.launches - start
        if self.pending >= self.loss_every:
            return self.flush_loss()
        return None

    def _kl_active_over_ranks(self, ws):
        """Free bits over ranks (§5.3, §10): this share's per-dimension KL sum from an encoder pass
        (its (n, 2Z) posterior copied to the host), the ranks' all-reduce of Z + 1 numbers
        (trainers.kl_active_over_ranks, as HostTrainer) and the decision, (Z,), back to the device."""
        from ..trainers import kl_active_over_ranks
        be, Z = self.backend, self.backend.spec.z_dim
        kl_sum, n = np.zeros(Z), 0
        if ws is not None:
            try:
                be._encoder(self.P, ws.x, ws.h_enc, ws.out)
                out = ws.out.copy_to_host().astype(np.float64)
                kl_sum, n = dist.kl_forward(out[:, :Z], out[:, Z:]).sum(axis=0), ws.n
            except Exception as e:     # joins the collective all the same (see _step)
                self.error, kl_sum = e, np.full(Z, np.nan)
        active = kl_active_over_ranks(self.comm, kl_sum, n, self.free_bits)
        if self._kl_active is None:
            self._kl_active = self.cuda.to_device(active)
        else:
            self._kl_active.copy_to_device(active)
        return self._kl_active

    def _update(self):
        """The optimizer step on the device; the step count t stays on the host.   §8"""
        be, opt = self.backend, self.optimizer
        ck = be.ck
        opt.t += 1
        t, P = opt.t, self.dp.shape[0]
        if opt.name == "adam":
            step_size = opt.lr / (1 - opt.beta1 ** t)
            inv_sqrt_bc2 = 1.0 / math.sqrt(1 - opt.beta2 ** t)
            be._launch1(ck.adam_update, P, self.dp, self.dg, self.dstate["m"], self.dstate["v"],
                        step_size, opt.beta1, opt.beta2, inv_sqrt_bc2, opt.eps, opt.weight_decay)
        elif opt.name == "sgd":
            be._launch1(ck.sgd_update, P, self.dp, self.dg, self.dstate["buf"], int(t == 1), opt.lr,
                        opt.momentum, opt.weight_decay)
        else:
            be._launch1(ck.adagrad_update, P, self.dp, self.dg, self.dstate["sum_sq"], opt.lr, opt.eps,
                        opt.weight_decay)

    def flush_loss(self):
        """The mean loss over the steps not yet reported (one scalar copied back), or None."""
        if self.pending == 0:
            return None
        total = self.backend._take_loss(self.loss_acc)
        mean, self.pending = total / self.pending, 0
        return mean

    # -- host copies -------------------------------------------------------------------------------
    def sync_params(self):
        """Copy the parameters into ``params`` and the optimizer state into ``optimizer.state``."""
        self.dp.copy_to_host(self.params)
        for k, d in self.dstate.items():
            d.copy_to_host(self.optimizer.state[k])

    def push_params(self):
        """The other way: after the host changed ``params`` or the optimizer state (e.g. a resume)."""
        self.dp.copy_to_device(self.params)
        for k, d in self.dstate.items():
            d.copy_to_device(self.optimizer.state[k])
