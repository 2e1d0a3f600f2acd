"""MultiTask (stacked heads vs a per-head loop), the loss weighting strategies against hand-computed
values, the trainer, and the `metafast multitask` job (metrics, checkpoints, exact resume)."""
import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metafast.multitask import (EqualWeighting, GradNorm, MultiTask, MultiTaskTrainer, UncertaintyWeighting,
                                make_weighting, per_task_accuracy)

TOL64 = dict(atol=1e-12, rtol=1e-10)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny matmuls: a second intra-op thread only adds wake-up stalls (tens of ms on a loaded 2-core box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(H=3, I=6, O=4, D=5, stack=True, bias=True, seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(D, I), nn.Tanh()).double()
    heads = [nn.Linear(I, O, bias=bias).double() for _ in range(H)]
    return MultiTask(trunk, heads, stack=stack), trunk, heads


# --------------------------------------------------------------------------------------------
# MultiTask
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_stacked_heads_match_the_original_linears(bias, assert_close):
    model, trunk, heads = make_model(bias=bias)
    assert model.stacked and model.heads is None
    assert model.head_weight.shape == (3, 4, 6) and (model.head_bias is None) == (not bias)
    x = torch.randn(7, 5, dtype=torch.float64)
    outs = model(x)
    for h, head in enumerate(heads):
        assert_close(outs[h], head(trunk(x)), name=f"head {h}", **TOL64)
        w, b = model.head(h)
        assert torch.equal(w, head.weight) and (b is None or torch.equal(b, head.bias))
    # head(h) returns views: editing one edits the model
    with torch.no_grad():
        model.head(1)[0].zero_()
    assert torch.all(model.head_weight[1] == 0)
    copies = model.unstacked_heads()
    assert all(isinstance(c, nn.Linear) for c in copies) and torch.equal(copies[1].weight, model.head_weight[1])


def test_heterogeneous_heads_fall_back_to_a_loop(assert_close):
    torch.manual_seed(0)
    trunk = nn.Linear(5, 6).double()
    heads = [nn.Linear(6, 3).double(), nn.Linear(6, 2).double(), nn.Sequential(nn.Linear(6, 4), nn.ReLU()).double()]
    model = MultiTask(trunk, heads)
    assert not model.stacked
    x = torch.randn(7, 5, dtype=torch.float64)
    outs = model(x)
    assert [o.shape[-1] for o in outs] == [3, 2, 4]
    for h in range(3):
        assert_close(outs[h], heads[h](trunk(x)), name=f"head {h}", **TOL64)
    y = [torch.randint(0, c, (7,)) for c in (3, 2, 4)]
    want = torch.stack([F.cross_entropy(heads[h](trunk(x)), y[h]) for h in range(3)])
    assert_close(model.losses(x, y), want, name="losses", **TOL64)


@pytest.mark.parametrize("inputs", ["shared", "per_task", "ragged"])
def test_fused_losses_and_gradients_match_the_loop(inputs, assert_close):
    """Stacked heads (one fused op) against the same model with stack=False (a loop of nn.Linear +
    F.cross_entropy), losses and every parameter's gradient, grad_output != 1."""
    fused, _, _ = make_model(seed=1)
    loop, _, _ = make_model(seed=1, stack=False)
    assert fused.stacked and not loop.stacked
    if inputs == "shared":
        x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 4, (3, 9))
    elif inputs == "per_task":
        x, y = [torch.randn(9, 5, dtype=torch.float64) for _ in range(3)], torch.randint(0, 4, (3, 9))
    else:  # different numbers of rows per task: the stacked heads then run one by one
        x = [torch.randn(n, 5, dtype=torch.float64) for n in (4, 9, 6)]
        y = [torch.randint(0, 4, (n,)) for n in (4, 9, 6)]
    g = torch.tensor([0.5, 2.0, -1.5], dtype=torch.float64)
    lf, ll = fused.losses(x, y), loop.losses(x, y)
    assert_close(lf, ll, name="losses", **TOL64)
    (lf * g).sum().backward()
    (ll * g).sum().backward()
    assert_close(fused.trunk[0].weight.grad, loop.trunk[0].weight.grad, name="trunk grad", **TOL64)
    for h in range(3):
        assert_close(fused.head_weight.grad[h], loop.heads[h].weight.grad, name=f"head {h} weight grad", **TOL64)
        assert_close(fused.head_bias.grad[h], loop.heads[h].bias.grad, name=f"head {h} bias grad", **TOL64)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("per_task", [False, True])
def test_losses_on_the_triton_backend(per_task, assert_close):
    model, _, _ = make_model(seed=2)
    x = torch.randn(3 if per_task else 1, 9, 5, dtype=torch.float64)
    x = list(x) if per_task else x[0]
    y = torch.randint(0, 4, (3, 9))
    g = torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64)
    grads = {}
    for backend in ("triton", "torch"):
        model.zero_grad()
        losses = model.losses(x, y, backend=backend)
        (losses * g).sum().backward()
        grads[backend] = (losses.detach(), *(p.grad.clone() for p in model.parameters()))
    for a, e in zip(grads["triton"], grads["torch"]):
        assert_close(a, e, name="loss / grad", atol=1e-11, rtol=1e-10)


def test_mse_and_callable_losses(assert_close):
    model, trunk, heads = make_model(O=2)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64)
    want = torch.stack([F.mse_loss(heads[h](trunk(x)), y[h]) for h in range(3)])
    assert_close(model.losses(x, y, "mse"), want, name="mse", **TOL64)
    l1 = model.losses(x, y, lambda out, t: (out - t).abs().mean())
    assert_close(l1, torch.stack([(heads[h](trunk(x)) - y[h]).abs().mean() for h in range(3)]), name="l1", **TOL64)


def test_model_bad_inputs():
    model, _, _ = make_model()
    with pytest.raises(TypeError, match="trunk must be an nn.Module"):
        MultiTask(lambda x: x, [nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="heads must be a non-empty sequence"):
        MultiTask(nn.Identity(), [])
    with pytest.raises(ValueError, match="per-task inputs must be a list of 3 tensors"):
        model([torch.randn(2, 5, dtype=torch.float64)] * 2)
    with pytest.raises(ValueError, match="targets must hold 3 tasks"):
        model.losses(torch.randn(2, 5, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="loss must be one of"):
        model.losses(torch.randn(2, 5, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.long), loss="hinge")
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 4\)"):
        model.losses(torch.randn(2, 5, dtype=torch.float64), torch.full((3, 2), 4))


def test_last_shared_parameters_is_the_last_trunk_weight():
    model, trunk, _ = make_model()
    (w,) = model.last_shared_parameters()
    assert w is trunk[0].weight


# --------------------------------------------------------------------------------------------
# Weighting strategies against hand-computed values
# --------------------------------------------------------------------------------------------
def test_equal_weighting():
    losses = torch.tensor([1.0, 2.5, 0.25], requires_grad=True)
    total = EqualWeighting(3).backward(losses)
    assert total.item() == 3.75
    assert torch.equal(losses.grad, torch.ones(3))


def test_uncertainty_weighting_hand_computed():
    u = UncertaintyWeighting(2, ["regression", "classification"]).double()
    with torch.no_grad():
        u.log_var.copy_(torch.tensor([0.5, -0.3], dtype=torch.float64))
    losses = torch.tensor([2.0, 0.7], dtype=torch.float64, requires_grad=True)
    total = u.backward(losses)
    # regression: 1/(2 sigma^2) L + log sigma = 0.5 e^{-s} L + s/2; classification: e^{-s} L + s/2
    want = 0.5 * math.exp(-0.5) * 2.0 + 0.25 + math.exp(0.3) * 0.7 - 0.15
    assert abs(total.item() - want) < 1e-12
    assert torch.allclose(losses.grad, torch.tensor([0.5 * math.exp(-0.5), math.exp(0.3)], dtype=torch.float64))
    want_ds = [-0.5 * math.exp(-0.5) * 2.0 + 0.5, -math.exp(0.3) * 0.7 + 0.5]
    assert torch.allclose(u.log_var.grad, torch.tensor(want_ds, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(u.weights(), torch.tensor([0.5 * math.exp(-0.5), math.exp(0.3)], dtype=torch.float64))


def _gradnorm_problem():
    """Shared W [2]; L_i = 0.5 (u_i . W)^2, so dL_i/dW = (u_i . W) u_i, ||.|| = |u_i . W| ||u_i||."""
    W = torch.tensor([0.5, 1.0], dtype=torch.float64, requires_grad=True)
    u = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    losses = 0.5 * (u @ W) ** 2
    norms = [2.5 * math.sqrt(5.0), 0.5 * math.sqrt(10.0)]  # u.W = 2.5, 0.5
    return W, u, losses, norms


def test_gradnorm_first_step_hand_computed():
    W, u, losses, (n1, n2) = _gradnorm_problem()
    gn = GradNorm(2, alpha=1.5).double()
    gn.backward(losses, [W])
    # first step: L(0) = L, so r = 1 and the target is mean(G) = (n1 + n2) / 2 for both
    assert torch.allclose(gn.initial_losses, torch.tensor([3.125, 0.125], dtype=torch.float64))
    assert torch.allclose(gn.task_weights.grad, torch.tensor([n1, -n2], dtype=torch.float64), atol=1e-12)
    # the network is trained on sum_i w_i L_i with w = 1
    assert torch.allclose(W.grad, 2.5 * u[0] + 0.5 * u[1], atol=1e-12)


def test_gradnorm_later_step_and_renormalisation_hand_computed():
    W, u, losses, (n1, n2) = _gradnorm_problem()
    gn = GradNorm(2, alpha=1.5).double()
    with torch.no_grad():
        gn.initial_losses.copy_(torch.tensor([6.25, 0.0625]))  # L/L(0) = 0.5, 2.0
        gn.task_weights.copy_(torch.tensor([0.8, 1.2], dtype=torch.float64))
    gn.backward(losses, [W])
    G1, G2 = 0.8 * n1, 1.2 * n2
    gbar = (G1 + G2) / 2
    r1, r2 = 0.5 / 1.25, 2.0 / 1.25
    t1, t2 = gbar * r1 ** 1.5, gbar * r2 ** 1.5
    want = [math.copysign(n1, G1 - t1), math.copysign(n2, G2 - t2)]
    assert torch.allclose(gn.task_weights.grad, torch.tensor(want, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(W.grad, 0.8 * 2.5 * u[0] + 1.2 * 0.5 * u[1], atol=1e-12)
    with torch.no_grad():
        gn.task_weights.copy_(torch.tensor([0.5, 2.5]))
    gn.after_step()
    assert torch.allclose(gn.task_weights, torch.tensor([1 / 3, 5 / 3], dtype=torch.float64))


def test_weighting_bad_inputs():
    with pytest.raises(ValueError, match="weighting must be one of"):
        make_weighting("pcgrad", 2)
    with pytest.raises(ValueError, match="num_tasks must be an integer >= 1"):
        EqualWeighting(0)
    with pytest.raises(ValueError, match="kinds must be one of"):
        UncertaintyWeighting(2, ["regression"])
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        GradNorm(2, alpha=-1.0)
    with pytest.raises(ValueError, match=r"losses must be a tensor \[2\]"):
        EqualWeighting(2).backward(torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="shared_params must name the last shared layer"):
        GradNorm(2).backward(torch.ones(2, requires_grad=True), [])


# --------------------------------------------------------------------------------------------
# Trainer and the job
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["equal", "uncertainty", "gradnorm"])
def test_trainer_learns_two_tasks(strategy):
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = torch.stack([(x[:, 0] > 0).long(), (x[:, 1] + x[:, 2] > 0).long()])
    model = MultiTask(nn.Sequential(nn.Linear(4, 16), nn.ReLU()), [nn.Linear(16, 2) for _ in range(2)])
    weighting = make_weighting(strategy, 2)
    opt = torch.optim.Adam(MultiTaskTrainer.parameter_groups(model, weighting, 1e-2, 1e-2))
    trainer = MultiTaskTrainer(model, weighting, opt)
    first = trainer.step(x, y)
    for _ in range(60):
        out = trainer.step(x, y)
    assert out["losses"].shape == (2,) and torch.all(out["losses"] < first["losses"])
    assert min(per_task_accuracy(model, x, y)) > 0.85
    if strategy == "gradnorm":
        assert abs(out["weights"].sum().item() - 2.0) < 1e-5  # renormalised every step
    if strategy != "equal":
        assert not torch.equal(out["weights"], torch.ones(2))


def _tiny_config(**kw):
    from metafast.jobs.multitask import MultiTaskConfig

    base = dict(iterations=12, tasks=3, classes=3, in_dim=6, latent=4, hidden=8, train_size=64, test_size=64,
                batch_size=16, checkpoint_every=5, device="cpu")
    base.update(kw)
    return MultiTaskConfig(**base)


def test_job_writes_metrics_and_resumes_exactly(tmp_path):
    from metafast.jobs.multitask import TrainingInterrupted, run_multitask
    from metafast.runtime.checkpoint import load_checkpoint

    full = run_multitask(_tiny_config(), str(tmp_path / "full"), progress=False, log=lambda s: None)
    with open(tmp_path / "full" / "metrics.json") as f:
        on_disk = json.load(f)
    assert list(on_disk["results"]) == ["equal", "uncertainty", "gradnorm"]
    for r in on_disk["results"].values():
        assert len(r["accuracy"]) == 3 and all(0.0 <= a <= 1.0 for a in r["accuracy"])
        assert abs(r["mean_accuracy"] - sum(r["accuracy"]) / 3) < 1e-12
    assert load_checkpoint(str(tmp_path / "full"))["strategy_index"] == 3

    def stop(name, iteration):
        if name == "uncertainty" and iteration == 7:
            raise KeyboardInterrupt

    out = str(tmp_path / "cut")
    with pytest.raises(TrainingInterrupted) as info:
        run_multitask(_tiny_config(), out, progress=False, log=lambda s: None, callback=stop)
    assert info.value.checkpoint is not None
    state = load_checkpoint(out)
    assert (state["strategy_index"], state["iteration"]) == (1, 7) and list(state["results"]) == ["equal"]
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        run_multitask(_tiny_config(), out, progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match="cannot resume with a different setup"):
        run_multitask(_tiny_config(alpha=0.5), out, resume=True, progress=False, log=lambda s: None)
    resumed = run_multitask(_tiny_config(), out, resume=True, progress=False, log=lambda s: None)
    assert resumed["results"] == full["results"]  # bit for bit


def test_command_runs_and_rejects_bad_arguments(tmp_path, capsys):
    from metafast.commands import multitask as command

    parser = argparse.ArgumentParser(prog="metafast")
    command.add_parser(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "run")
    args = parser.parse_args(["multitask", "--iterations", "3", "--tasks", "2", "--strategies", "equal,gradnorm",
                              "--device", "cpu", "--no-progress", "--out", out])
    assert args.handler(args) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert list(metrics["results"]) == ["equal", "gradnorm"] and len(metrics["results"]["equal"]["accuracy"]) == 2
    assert "test accuracy per task" in capsys.readouterr().out
    # resuming a finished run re-reports it without training
    args = parser.parse_args(["multitask", "--resume", out, "--no-progress"])
    assert args.handler(args) == 0
    with open(os.path.join(out, "metrics.json")) as f:
        assert json.load(f)["results"] == metrics["results"]
    args = parser.parse_args(["multitask", "--resume", out, "--alpha", "0.5"])
    assert args.handler(args) == 2
    assert "cannot resume with a different setup" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["multitask", "--strategies", "equal,pcgrad"])
    args = parser.parse_args(["multitask", "--resume", str(tmp_path / "nothing")])
    assert args.handler(args) == 2
    assert "no checkpoint" in capsys.readouterr().err
