"""The paper's recipe as options (minivae/recipe.py): learning-rate schedules, Adam's epsilon and the
decoder's output bias from the data, alone and inside a training run (resume stays bit-identical)."""
import json
from pathlib import Path

import numpy as np
import pytest

from minivae import VAE
from minivae import distributions as dist
from minivae.cli import main
from minivae.recipe import IWAE_PASSES, iwae_stage, lr_at, output_bias_from_data
from minivae.train import Run, SerialComm, TrainConfig, train


def small(tmp_path, name="run", **kw):
    base = dict(dataset="digits", hidden=(16,), z_dim=2, epochs=2, batch_size=100, quiet=True,
                plots=False, out=str(tmp_path / name))
    base.update(kw)
    return TrainConfig(**base)


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# -- schedules ---------------------------------------------------------------------------------

def test_iwae_schedule_is_the_papers():
    """Stage i covers 3^i passes: epoch 1 is stage 0, epochs 2-4 stage 1, 5-13 stage 2, ..., the last
    2187 epochs of 3280 stage 7, at lr 10^(-i/7); past 3280 the rate stays at lr / 10."""
    assert IWAE_PASSES == 3280
    first = 1
    for i in range(8):
        last = first + 3 ** i - 1
        for e in (first, last):
            assert iwae_stage(e) == i
            assert lr_at("iwae", 1e-3, e) == pytest.approx(1e-3 * 10 ** (-i / 7), rel=1e-15)
        first = last + 1
    assert first == 3281
    assert lr_at("iwae", 1e-3, 5000) == pytest.approx(1e-4, rel=1e-15)
    lrs = [lr_at("iwae", 2e-3, e) for e in range(1, 4000)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))              # never rises


def test_step_and_constant_schedules():
    assert [lr_at("constant", 0.5, e) for e in (1, 5, 9)] == [0.5, 0.5, 0.5]
    got = [lr_at("step", 1.0, e, step_epochs=3, gamma=0.5) for e in range(1, 10)]
    assert got == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]
    with pytest.raises(ValueError, match="lr schedule"):
        lr_at("cosine", 1.0, 1)


# -- the output bias ---------------------------------------------------------------------------

def test_output_bias_matches_the_data_mean_for_every_likelihood():
    rng = np.random.default_rng(0)
    x = rng.beta(0.5, 2.0, size=(500, 30))
    x[:, 0] = 0.0                                                  # a pixel that is always off
    m = np.clip(x.mean(0), 1e-3, 1 - 1e-3)
    b = output_bias_from_data("bernoulli", x, 1e-4)
    np.testing.assert_allclose(dist._sigmoid(b), m, rtol=1e-12)
    b = output_bias_from_data("continuous_bernoulli", x, 1e-4)
    np.testing.assert_allclose(dist.cb_mean(b), m, rtol=1e-9, atol=1e-12)
    b = output_bias_from_data("gaussian", x[:, 1:], 1e-4)
    D = x.shape[1] - 1
    np.testing.assert_allclose(b[:D], x[:, 1:].mean(0), rtol=1e-12)
    np.testing.assert_allclose(dist.gaussian_var(b[D:], 1e-4), x[:, 1:].var(0), rtol=1e-9)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        output_bias_from_data("bernoulli", x[:0], 1e-4)


def test_run_starts_from_the_data_bias(tmp_path):
    cfg = small(tmp_path, init_output_bias="data", likelihood="bernoulli")
    run = Run(cfg, SerialComm())
    b = run.model.layout.view(run.model.params, "dec.head.b")
    np.testing.assert_allclose(b, output_bias_from_data("bernoulli", run.x_train, 1e-4).astype(np.float32))
    plain = Run(small(tmp_path, name="plain"), SerialComm())
    assert not np.allclose(plain.model.layout.view(plain.model.params, "dec.head.b"), b)


def test_data_bias_lowers_the_first_loss(tmp_path):
    """The model that starts at the data's mean starts better than the one that starts at 0.5."""
    first = {}
    for init in ("zero", "data"):
        cfg = small(tmp_path, name=init, init_output_bias=init, epochs=1, binarize="static")
        run = Run(cfg, SerialComm())
        loss, _ = run.model.loss_and_grad(run.x_train[:500], eps=np.zeros((500, 2), np.float32))
        first[init] = loss
    assert first["data"] < first["zero"] - 5


# -- inside a run ------------------------------------------------------------------------------

def test_step_schedule_in_metrics_and_adam_eps(tmp_path):
    cfg = small(tmp_path, epochs=3, lr=1e-3, lr_schedule="step", lr_step_epochs=1, lr_gamma=0.5, adam_eps=1e-4)
    train(cfg)
    assert [r["lr"] for r in rows(cfg.out)] == pytest.approx([1e-3, 5e-4, 2.5e-4], rel=1e-15)
    run = Run(small(tmp_path, name="eps", adam_eps=1e-4), SerialComm())
    assert run.optimizer.eps == 1e-4


def test_resume_with_a_schedule_is_bit_identical(tmp_path):
    whole = small(tmp_path, name="whole", epochs=3, lr_schedule="step", lr_step_epochs=1, lr_gamma=0.5,
                  init_output_bias="data")
    train(whole)
    part = small(tmp_path, name="part", epochs=2, lr_schedule="step", lr_step_epochs=1, lr_gamma=0.5,
                 init_output_bias="data")
    train(part)
    assert main(["train", "--resume", part.out, "--epochs", "3", "--quiet", "--no-plots"]) == 0
    a = VAE.load(Path(whole.out) / "model.npz").params
    b = VAE.load(Path(part.out) / "model.npz").params
    np.testing.assert_array_equal(a, b)
    assert [r["lr"] for r in rows(whole.out)] == [r["lr"] for r in rows(part.out)]


@pytest.mark.parametrize("flags, message", [
    (["--lr-schedule", "cosine"], "invalid choice"),
    (["--lr-gamma", "0"], "(0, 1]"),
    (["--lr-gamma", "1.5"], "(0, 1]"),
    (["--lr-step-epochs", "0"], "positive integer"),
    (["--adam-eps", "-1"], "> 0"),
    (["--init-output-bias", "mean"], "invalid choice"),
])
def test_bad_recipe_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["train", *flags, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
