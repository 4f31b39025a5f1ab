"""Layers and the flat parameter vector (docs/math.md §1-§2): forward values against their
definitions, dtypes kept, MLPs of any depth (including none), and the layout's named views.
Their gradients are checked in test_gradients.py."""
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import special

from minivae.layers import (ACTIVATIONS, LEAKY_SLOPE, activation_backward, activation_forward,
                            linear_backward, linear_forward, mlp_backward, mlp_forward, softplus)
from minivae.model import ModelSpec
from minivae.params import ParamLayout


def test_linear_forward_is_x_W_plus_b(rng):
    x, W, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal(5)
    a, _ = linear_forward(x, W, b)
    ref = np.array([[sum(x[i, k] * W[k, j] for k in range(3)) + b[j] for j in range(5)] for i in range(4)])
    np.testing.assert_allclose(a, ref, rtol=1e-13)


def test_linear_backward_shapes(rng):
    x, W, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 5)), rng.standard_normal(5)
    _, cache = linear_forward(x, W, b)
    dx, dW, db = linear_backward(np.ones((4, 5)), cache)
    assert dx.shape == x.shape and dW.shape == W.shape and db.shape == b.shape
    np.testing.assert_allclose(db, 4.0)                       # every row contributes 1


def test_activation_values():
    a = np.array([-3.0, -0.5, 0.0, 0.5, 3.0])
    np.testing.assert_array_equal(activation_forward(a, "relu")[0], [0, 0, 0, 0.5, 3.0])
    np.testing.assert_allclose(activation_forward(a, "leaky_relu")[0], [-0.03, -0.005, 0, 0.5, 3.0], rtol=1e-15)
    assert LEAKY_SLOPE == 0.01
    np.testing.assert_allclose(activation_forward(a, "tanh")[0], np.tanh(a), rtol=1e-15)
    np.testing.assert_allclose(activation_forward(a, "softplus")[0], np.log1p(np.exp(a)), rtol=1e-15)


def test_activation_derivatives_at_and_around_the_kink():
    """relu' and leaky_relu' take the a > 0 branch: 0 (slope) at a = 0, as PyTorch does."""
    a = np.array([-1.0, 0.0, 1.0])
    dh = np.ones(3)
    np.testing.assert_array_equal(activation_backward(dh, activation_forward(a, "relu")[1]), [0, 0, 1])
    np.testing.assert_array_equal(activation_backward(dh, activation_forward(a, "leaky_relu")[1]),
                                  [LEAKY_SLOPE, LEAKY_SLOPE, 1])
    np.testing.assert_allclose(activation_backward(dh, activation_forward(a, "tanh")[1]), 1 - np.tanh(a) ** 2)
    np.testing.assert_allclose(activation_backward(dh, activation_forward(a, "softplus")[1]), special.expit(a))


@given(a=st.floats(-1e4, 1e4, allow_nan=False))
def test_softplus_is_stable(a):
    v = softplus(np.array([a]))[0]
    assert np.isfinite(v) and v >= 0 and v >= a
    assert v == pytest.approx(np.logaddexp(0.0, a), rel=1e-14, abs=1e-300)
    assert np.isfinite(activation_backward(np.ones(1), activation_forward(np.array([a]), "softplus")[1])).all()


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activations_keep_the_dtype(kind, dtype):
    a = np.linspace(-3, 3, 12, dtype=dtype).reshape(3, 4)
    h, cache = activation_forward(a, kind)
    da = activation_backward(np.ones_like(a), cache)
    assert h.dtype == dtype and da.dtype == dtype


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown activation 'gelu'; expected one of relu, tanh, softplus, leaky_relu"):
        activation_forward(np.zeros(2), "gelu")


def test_mlp_with_no_layers_is_the_identity(rng):
    x = rng.standard_normal((3, 4))
    h, caches = mlp_forward(x, [], "relu")
    assert h is x and caches == []
    dx, grads = mlp_backward(x, caches)
    assert dx is x and grads == []


def test_mlp_composes_linear_and_activation(rng):
    x = rng.standard_normal((3, 4))
    layers = [(rng.standard_normal((4, 5)), rng.standard_normal(5)), (rng.standard_normal((5, 2)), rng.standard_normal(2))]
    h, _ = mlp_forward(x, layers, "tanh")
    ref = np.tanh(np.tanh(x @ layers[0][0] + layers[0][1]) @ layers[1][0] + layers[1][1])
    np.testing.assert_allclose(h, ref, rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# the flat parameter vector  §1
# ----------------------------------------------------------------------------------------------

def test_layout_names_order_and_size():
    spec = ModelSpec(10, 3, hidden=(8, 6), likelihood="gaussian")
    lay = spec.layout
    assert lay.names == ["enc.0.W", "enc.0.b", "enc.1.W", "enc.1.b", "enc.head.W", "enc.head.b",
                         "dec.0.W", "dec.0.b", "dec.1.W", "dec.1.b", "dec.head.W", "dec.head.b"]
    shapes = [(10, 8), (8,), (8, 6), (6,), (6, 6), (6,), (3, 6), (6,), (6, 8), (8,), (8, 20), (20,)]
    assert [lay.slots[n].shape for n in lay.names] == shapes
    assert lay.size == sum(math.prod(s) for s in shapes)
    offsets = [lay.slots[n].offset for n in lay.names]     # contiguous, in order, no gaps
    assert offsets == list(np.cumsum([0] + [math.prod(s) for s in shapes[:-1]]))


def test_layout_without_hidden_layers():
    lay = ModelSpec(5, 2, hidden=()).layout
    assert lay.names == ["enc.head.W", "enc.head.b", "dec.head.W", "dec.head.b"]
    assert lay.slots["enc.head.W"].shape == (5, 4) and lay.slots["dec.head.W"].shape == (2, 5)


def test_views_write_through_to_the_flat_vector():
    lay = ParamLayout([("enc.0", 3, 2), ("enc.head", 2, 4)])
    flat = np.zeros(lay.size)
    views = lay.views(flat)
    views["enc.head.b"][...] = 7.0
    views["enc.0.W"][1, 0] = 5.0
    s = lay.slots["enc.head.b"]
    assert np.all(flat[s.offset:s.offset + 4] == 7.0)
    assert flat[lay.slots["enc.0.W"].offset + 2] == 5.0       # row-major (fan_in, fan_out)
    assert np.count_nonzero(flat) == 5
    for v in views.values():
        assert np.shares_memory(v, flat)


def test_views_reject_a_wrong_size_vector():
    lay = ParamLayout([("enc.0", 3, 2)])
    with pytest.raises(ValueError, match=f"expected a flat vector of {lay.size} elements"):
        lay.views(np.zeros(lay.size + 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_is_pytorch_linear_default(dtype):
    """W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per layer, in the requested dtype."""
    lay = ParamLayout([("enc.0", 400, 50), ("enc.head", 50, 4)])
    flat = lay.init(np.random.default_rng(0), dtype)
    assert flat.dtype == dtype and flat.flags.c_contiguous
    for prefix, fan_in, _ in lay.layers:
        bound = 1 / math.sqrt(fan_in)
        for n in (prefix + ".W", prefix + ".b"):
            v = lay.view(flat, n)
            assert v.min() >= -bound and v.max() <= bound
        w = lay.view(flat, prefix + ".W")
        assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)   # uniform's std
