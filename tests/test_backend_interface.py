"""Every VAE backend class has the declared interface (minivae/kernels/interface.py): the Protocol's
methods with compatible signatures (same parameters, positions and defaults; extra ones only with a
default) and the optional capabilities as attributes. Import only: no GPU is needed for signatures."""
import numpy as np
import pytest

from minivae import VAE, kernels
from minivae.kernels import interface
from minivae.kernels.interface import Backend, declare, missing_or_different

# backend classes that differ from the Protocol today, and why (each is an xfail of its own case);
# none today: kernels/cpu.py's NumbaBackend and kernels/cuda.py's CudaBackend take kl_active and estimator
KNOWN_DIFFERENCES = {}


def _case(key):
    marks = [pytest.mark.xfail(reason=KNOWN_DIFFERENCES[key], strict=True)] if key in KNOWN_DIFFERENCES else []
    return pytest.param(key, marks=marks, id=f"{key[0]}-{'stack' if key[1] else 'one-layer'}")


@pytest.mark.parametrize("key", [_case(k) for k in kernels.REGISTRY])
def test_every_registered_backend_class_conforms(key):
    cls = kernels.backend_class(*key)
    assert missing_or_different(cls) == []


@pytest.mark.parametrize("key", list(kernels.REGISTRY), ids=lambda k: f"{k[0]}-{'stack' if k[1] else 'one'}")
def test_every_backend_class_has_every_capability_as_an_attribute(key):
    cls = kernels.backend_class(*key)
    for name in interface.CAPABILITY_DEFAULTS:
        assert hasattr(cls, name), name
    assert "reparam" in cls.estimators
    assert cls.make_trainer is None or callable(cls.make_trainer)
    assert all(callable(f) for f in cls.update_kernels.values())


def test_the_registry_names_the_classes_the_brief_lists():
    names = {kernels.backend_class(*k).__name__ for k in kernels.REGISTRY}
    assert names == {"NumpyBackend", "NumbaBackend", "NumbaStackBackend", "CudaBackend", "CudaStackBackend"}


def test_the_known_capabilities_of_each_backend():
    """What the backends declare today (the defaults fill in only what a class lacks)."""
    assert kernels.backend_class("numpy").estimators == ("reparam", "score", "dreg")
    assert kernels.backend_class("numba").estimators == ("reparam", "dreg")      # dreg: cpu_stack's pass
    assert kernels.backend_class("cuda").estimators == ("reparam",)
    assert kernels.backend_class("cuda", stack=True).estimators == ("reparam", "dreg")
    assert kernels.backend_class("numba", stack=True).estimators == ("reparam", "dreg")
    assert set(kernels.backend_class("numba").update_kernels) == {"sgd", "adagrad", "adam"}
    assert kernels.backend_class("cuda").make_trainer is not None                  # CudaTrainer
    assert kernels.backend_class("numpy").make_trainer is None


def test_the_checker_reports_each_kind_of_difference():
    """missing_or_different is not vacuous: a class with a missing method, a renamed parameter, a
    changed default and an extra required parameter gets one line for each."""
    class Bad:
        def encode(self, params, x):
            pass

        def bound(self, params, x, noise, objective="elbo", beta=1.0):      # eps renamed
            pass

        def loss_and_grad(self, params, x, eps, beta=2.0, objective="elbo", free_bits=0.0, grad=None,
                          kl_active=None, estimator="reparam", extra=None, *, required_extra):
            pass

    lines = missing_or_different(Bad)
    text = "\n".join(lines)
    assert "decode: missing" in text
    assert "bound: parameter 'eps'" in text
    assert "loss_and_grad: beta defaults to 2.0" in text
    assert "extra parameter 'required_extra' without a default" in text
    assert "estimators: capability not declared" in text
    declare(Bad)
    assert "capability not declared" not in "\n".join(missing_or_different(Bad))


def test_a_backend_that_a_model_uses_satisfies_the_runtime_protocol():
    m = VAE(6, 2, hidden=(5,), dtype="float64", backend="numpy")
    assert isinstance(m.backend, Backend)
    x = np.random.default_rng(0).random((3, 6)) > 0.5
    loss, grad = m.backend.loss_and_grad(m.params, x.astype(np.float64), np.zeros((1, 3, 2)),
                                         kl_active=None, estimator="reparam")
    assert np.isfinite(loss) and grad.shape == m.params.shape


def test_an_estimator_a_backend_lacks_is_refused_naming_the_backends_that_have_it():
    """interface.require_estimator, the one check of the capability (the backends' loss_and_grad, the
    model, the trainers and the run's configuration use it): one line, naming the backends whose class
    declares the estimator for this kind of model."""
    assert interface.implementing("reparam") == ["numpy", "numba", "cuda"]
    assert interface.implementing("dreg") == ["numpy", "numba"]
    assert interface.implementing("dreg", stack=True) == ["numpy", "numba", "cuda"]
    assert interface.implementing("score") == ["numpy"]
    interface.require_estimator(kernels.backend_class("numba"), "dreg")          # declared: no error
    with pytest.raises(ValueError) as e:
        interface.require_estimator(kernels.backend_class("cuda"), "dreg", stack=False)
    assert str(e.value) == ("estimator 'dreg' is not implemented on backend 'cuda' for one stochastic layer; "
                            "it runs on backend 'numpy' or 'numba' only")
    with pytest.raises(ValueError, match="^unknown estimator 'pathwise'"):
        interface.require_estimator(kernels.backend_class("numba"), "pathwise")


def test_the_numba_backend_refuses_what_it_lacks_in_loss_and_grad():
    """Called directly (not through the model), the backend itself refuses an estimator it lacks."""
    m = VAE(6, 2, hidden=(5,), dtype="float64", backend="numba")
    x = (np.random.default_rng(1).random((3, 6)) > 0.5).astype(np.float64)
    with pytest.raises(ValueError, match="estimator 'score' is not implemented on backend 'numba' for one "
                                         "stochastic layer; it runs on backend 'numpy' only"):
        m.backend.loss_and_grad(m.params, x, np.zeros((1, 3, 2)), estimator="score")


def test_the_run_configuration_and_auto_follow_the_declared_estimators():
    """trainconfig: --estimator dreg of one stochastic layer on numba is accepted (the backend declares
    it), on cuda refused with the backends that run it; --backend auto picks the fastest that does."""
    from minivae.trainconfig import TrainConfig, auto_backend
    TrainConfig(objective="iwae", estimator="dreg", backend="numba").validate()
    with pytest.raises(ValueError, match="--estimator dreg runs on --backend numpy or numba only, got 'cuda'"):
        TrainConfig(objective="iwae", estimator="dreg", backend="cuda").validate()
    TrainConfig(objective="iwae", estimator="dreg", backend="cuda", z_dim=(3, 2), hidden=((4,), ())).validate()
    dreg = TrainConfig(objective="iwae", estimator="dreg", backend="auto")
    assert auto_backend(dreg, gpu=True) == "numba" and auto_backend(dreg, gpu=False) == "numba"
    score = TrainConfig(objective="elbo", estimator="score", backend="auto")
    assert auto_backend(score, gpu=True) == "numpy"
    stack = TrainConfig(objective="iwae", estimator="dreg", backend="auto", z_dim=(3, 2), hidden=((4,), ()))
    assert auto_backend(stack, gpu=True) == "cuda"
    assert auto_backend(TrainConfig(), gpu=True) == "cuda" and auto_backend(TrainConfig(), gpu=False) == "numba"


def test_the_summary_says_why_auto_chose_its_backend():
    """trainconfig.auto_reason: the reason format_summary prints next to an auto-chosen backend."""
    from dataclasses import replace
    from minivae.train import format_summary, summarize
    from minivae.trainconfig import TrainConfig, auto_backend, auto_reason
    base = TrainConfig()
    for kw, gpu, backend, reason in [
            (dict(), True, "cuda", "a GPU is usable"),
            (dict(), False, "numba", "no usable GPU"),
            (dict(objective="iwae", samples=3, estimator="dreg"), True, "numba",
             "the dreg estimator does not run on cuda"),
            (dict(estimator="score"), True, "numpy", "the score estimator runs on numpy only")]:
        c = replace(base, **kw)
        c = replace(c, backend=auto_backend(c, gpu))
        assert c.backend == backend and auto_reason(c, gpu) == reason
        text = format_summary(summarize([], "runs/x", backend=c.backend, backend_auto=auto_reason(c, gpu)))
        assert f"{backend} (chosen by --backend auto: {reason})" in text
