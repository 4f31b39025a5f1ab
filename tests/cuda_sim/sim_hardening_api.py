"""Issue 10 under the simulator: VAE(backend="cuda") refuses bad grad buffers and non-numbers with the
very message of the NumPy backend (the checks live in the model, before any backend), and fills a
good grad buffer in place."""
import numpy as np
import pytest

from minivae import VAE


def _models():
    kw = dict(hidden=(3,), dtype="float32", seed=0)
    return VAE(7, 2, backend="numpy", **kw), VAE(7, 2, backend="cuda", **kw)


@pytest.mark.parametrize("case", ["float64", "short", "strided", "read-only", "beta str", "beta bool"])
def test_cuda_refuses_what_numpy_refuses_with_the_same_message(case, rng):
    x = (rng.random((3, 7)) > 0.5).astype(np.float32)
    eps = rng.standard_normal((1, 3, 2)).astype(np.float32)
    messages = []
    for m in _models():
        p = m.params
        ro = np.empty_like(p)
        ro.flags.writeable = False
        kw = {"float64": dict(grad=np.empty(p.size)), "short": dict(grad=np.empty(p.size - 1, np.float32)),
              "strided": dict(grad=np.empty(2 * p.size, np.float32)[::2]), "read-only": dict(grad=ro),
              "beta str": dict(beta="0.5"), "beta bool": dict(beta=True)}[case]
        with pytest.raises(ValueError) as e:
            m.loss_and_grad(x, eps=eps, **kw)
        messages.append(str(e.value))
    assert messages[0] == messages[1]


def test_cuda_fills_a_good_grad_buffer(rng):
    x = (rng.random((3, 7)) > 0.5).astype(np.float32)
    eps = rng.standard_normal((1, 3, 2)).astype(np.float32)
    cpu, gpu = _models()
    buf = np.full_like(gpu.params, np.nan)
    _, g = gpu.loss_and_grad(x, eps=eps, grad=buf)
    assert g is buf
    np.testing.assert_allclose(buf, cpu.loss_and_grad(x, eps=eps)[1], rtol=1e-4, atol=1e-5)
