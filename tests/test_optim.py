"""Optimizers (docs/math.md §8): hand-computed update sequences, the formulas of torch.optim's docs,
torch.optim itself when it is installed, state round trips and bad hyper-parameters."""
import math

import numpy as np
import pytest

from minivae.optim import SGD, Adagrad, Adam, make_optimizer

P0 = [1.0, -2.0]
GRADS = ([1.0, 2.0], [0.5, -1.0], [-1.0, 0.0])    # a fixed gradient per step, independent of p


def run(opt, grads=GRADS, p0=P0):
    p = np.array(p0, dtype=np.float64)
    out = []
    for g in grads:
        opt.step(p, np.array(g, dtype=np.float64))
        out.append(p.copy())
    return out


# ----------------------------------------------------------------------------------------------
# Sequences worked out by hand (lr 0.1 throughout)
# ----------------------------------------------------------------------------------------------

def test_sgd_momentum_by_hand():
    # buf1 = g1 = [1, 2]                          p1 = [1, -2] - 0.1 [1, 2]      = [0.9, -2.2]
    # buf2 = 0.9 [1, 2] + [0.5, -1] = [1.4, 0.8]  p2 = [0.9, -2.2] - 0.1 [1.4, 0.8] = [0.76, -2.28]
    # buf3 = 0.9 [1.4, 0.8] + [-1, 0] = [0.26, 0.72]  p3 = [0.76 - 0.026, -2.28 - 0.072]
    p1, p2, p3 = run(SGD(2, "float64", lr=0.1, momentum=0.9))
    np.testing.assert_allclose(p1, [0.9, -2.2], rtol=1e-14)
    np.testing.assert_allclose(p2, [0.76, -2.28], rtol=1e-14)
    np.testing.assert_allclose(p3, [0.734, -2.352], rtol=1e-14)


def test_sgd_weight_decay_by_hand():
    # g_eff = g + 0.1 p, no momentum, g = [1, 2] every step:
    # g_eff1 = [1.1, 1.8]          p1 = [0.89, -2.18]
    # g_eff2 = [1.089, 1.782]      p2 = [0.7811, -2.3582]
    # g_eff3 = [1.07811, 1.76418]  p3 = [0.673289, -2.534618]
    p1, p2, p3 = run(SGD(2, "float64", lr=0.1, momentum=0.0, weight_decay=0.1), grads=[[1.0, 2.0]] * 3)
    np.testing.assert_allclose(p1, [0.89, -2.18], rtol=1e-14)
    np.testing.assert_allclose(p2, [0.7811, -2.3582], rtol=1e-14)
    np.testing.assert_allclose(p3, [0.673289, -2.534618], rtol=1e-14)


def test_adagrad_by_hand():
    # s1 = [1, 4]        p1 = [1 - 0.1 * 1/1, -2 - 0.1 * 2/2]              = [0.9, -2.1]
    # s2 = [1.25, 5]     p2 = [0.9 - 0.1 * 0.5/sqrt(1.25), -2.1 + 0.1 * 1/sqrt(5)]
    # s3 = [2.25, 5]     p3 = [p2[0] + 0.1 * 1/1.5, p2[1] - 0]
    p1, p2, p3 = run(Adagrad(2, "float64", lr=0.1, eps=0.0))
    np.testing.assert_allclose(p1, [0.9, -2.1], rtol=1e-14)
    p2_hand = [0.9 - 0.05 / math.sqrt(1.25), -2.1 + 0.1 / math.sqrt(5)]
    np.testing.assert_allclose(p2, p2_hand, rtol=1e-14)
    np.testing.assert_allclose(p3, [p2_hand[0] + 0.1 / 1.5, p2_hand[1]], rtol=1e-14)


def test_adam_by_hand():
    # beta1 0.9, beta2 0.999, eps 0 (so the numbers stay short)
    # t=1: m = [0.1, 0.2], v = [0.001, 0.004]; m^ = [1, 2], v^ = [1, 4]; step 0.1 [1, 1]
    #      p1 = [0.9, -2.1]
    # t=2: m = 0.9 [0.1, 0.2] + 0.1 [0.5, -1] = [0.14, 0.08]
    #      v = 0.999 [0.001, 0.004] + 0.001 [0.25, 1] = [0.001249, 0.004996]
    #      m^ = m / 0.19, v^ = v / 0.001999
    # t=3: m = 0.9 [0.14, 0.08] + 0.1 [-1, 0] = [0.026, 0.072]
    #      v = 0.999 [0.001249, 0.004996] + 0.001 [1, 0] = [0.002247751, 0.004991004]
    #      m^ = m / 0.271, v^ = v / 0.002997001
    p1, p2, p3 = run(Adam(2, "float64", lr=0.1, eps=0.0))
    np.testing.assert_allclose(p1, [0.9, -2.1], rtol=1e-14)
    step2 = 0.1 * (np.array([0.14, 0.08]) / 0.19) / np.sqrt(np.array([0.001249, 0.004996]) / 0.001999)
    np.testing.assert_allclose(p2, np.array([0.9, -2.1]) - step2, rtol=1e-12)
    step3 = 0.1 * (np.array([0.026, 0.072]) / 0.271) / np.sqrt(np.array([0.002247751, 0.004991004]) / 0.002997001)
    np.testing.assert_allclose(p3, p2 - step3, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# The algorithms as torch.optim's documentation writes them (lambda = weight decay)
# ----------------------------------------------------------------------------------------------

def torch_docs_sgd(p, grads, lr, mu, wd):
    b = None
    for t, g in enumerate(grads, 1):
        g = g + wd * p
        b = g if t == 1 else mu * b + g          # dampening 0
        p = p - lr * b
    return p


def torch_docs_adagrad(p, grads, lr, wd, eps):
    s = np.zeros_like(p)
    for g in grads:
        g = g + wd * p
        s = s + g * g
        p = p - lr * g / (np.sqrt(s) + eps)
    return p


def torch_docs_adam(p, grads, lr, b1, b2, wd, eps):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_matches_torch_docs_formulas(name, rng):
    p0 = rng.standard_normal(7)
    grads = [rng.standard_normal(7) for _ in range(12)]
    hyper = {"sgd": dict(lr=0.05, momentum=0.8, weight_decay=0.01),
             "adagrad": dict(lr=0.05, eps=1e-10, weight_decay=0.01),
             "adam": dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)}[name]
    opt = make_optimizer(name, 7, "float64", **hyper)
    p = p0.copy()
    for g in grads:
        opt.step(p, g)
    if name == "sgd":
        ref = torch_docs_sgd(p0, grads, 0.05, 0.8, 0.01)
    elif name == "adagrad":
        ref = torch_docs_adagrad(p0, grads, 0.05, 0.01, 1e-10)
    else:
        ref = torch_docs_adam(p0, grads, 0.01, 0.9, 0.99, 0.01, 1e-8)
    np.testing.assert_allclose(p, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_matches_torch_optim(name, rng):
    torch = pytest.importorskip("torch")
    p0 = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(8)]
    mine = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=0.01),
            "adagrad": dict(lr=0.05, weight_decay=0.01),
            "adam": dict(lr=0.01, weight_decay=0.01)}[name]
    cls = {"sgd": torch.optim.SGD, "adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam}[name]
    tp = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    topt = cls([tp], **mine)
    opt = make_optimizer(name, 5, "float64", **mine)
    p = p0.copy()
    for g in grads:
        tp.grad = torch.tensor(g, dtype=torch.float64)
        topt.step()
        opt.step(p, g)
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# State and checks
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_state_dict_round_trip_continues_identically(name, rng):
    grads = [rng.standard_normal(4).astype(np.float32) for _ in range(6)]
    a = make_optimizer(name, 4, "float32")
    pa = np.ones(4, dtype=np.float32)
    for g in grads[:3]:
        a.step(pa, g)
    b = make_optimizer(name, 4, "float32")
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    pb = pa.copy()
    assert b.t == a.t == 3
    for g in grads[3:]:
        a.step(pa, g)
        b.step(pb, g)
    assert np.array_equal(pa, pb)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="rmsprop"), "unknown optimizer"),
    (dict(name="adam", lr=float("nan")), "learning rate"),
    (dict(name="adam", lr=0.0), "learning rate"),
    (dict(name="sgd", momentum=1.0), "momentum"),
    (dict(name="adam", weight_decay=-1.0), "weight decay"),
    (dict(name="adam", betas=(0.9, 1.0)), "betas"),
])
def test_bad_hyper_parameters(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        make_optimizer(name, 3, "float32", **kwargs)


def test_load_state_dict_rejects_wrong_size():
    opt = make_optimizer("adam", 3, "float32")
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict({"opt.m": np.zeros(4), "opt.v": np.zeros(3), "opt.t": np.array(1)})
