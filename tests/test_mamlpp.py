"""MAML++ options of BatchedMAML against a float64 per-task autograd reference (rel. err <= 1e-10), the
paper's schedules, derivative-order annealing across a checkpoint, and bad input."""
import math

import pytest
import torch

import metafast
from maml_reference import per_task_maml
from metafast import BatchedMAML
from metafast.algorithms.mamlpp import is_first_order, msl_weights, step_loss_weights
from meta_paths import assert_path
from test_batched_maml import DT, TOL, flat, make, rel_err
from test_vision_train import cifar_root, one_thread  # noqa: F401  (fixtures)


def paper_weights(epoch, K, num_epochs):
    """get_per_step_loss_importance_vector of the paper's code (HowToTrainYourMAMLPytorch), verbatim in numpy."""
    import numpy as np
    loss_weights = np.ones(shape=(K,)) * (1.0 / K)
    decay_rate = 1.0 / K / num_epochs
    min_value_for_non_final_losses = 0.03 / K
    for i in range(len(loss_weights) - 1):
        loss_weights[i] = np.maximum(loss_weights[i] - (epoch * decay_rate), min_value_for_non_final_losses)
    loss_weights[-1] = np.minimum(loss_weights[-1] + (epoch * (K - 1) * decay_rate),
                                  1.0 - ((K - 1) * min_value_for_non_final_losses))
    return loss_weights.tolist()


def lslr_reference_rates(maml):
    """LSLR's rates as the reference takes them: per step, parameter name -> scalar (views of step_lrs)."""
    names = [s.name for s in maml._flat.slots[maml._engine._first_adapted_slot:]]
    return [{n: maml.step_lrs[k, i] for i, n in enumerate(names)} for k in range(maml.step_lrs.shape[0])]


def used_path(maml):
    return next(iter(maml._signatures.values()))[0].name


@pytest.mark.parametrize("kind", ["mlp", "conv4_bn"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("option", ["lslr", "msl", "both"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("path,memory", [("autograd", "fast"), ("exact_reverse", "fast"), ("exact_reverse", "low")])
def test_meta_gradient_matches_per_task_reference(kind, steps, option, first_order, path, memory):
    torch.manual_seed(0)
    model, batch, loss = make(kind)
    lr = 0.1 if loss == "mse" else 0.3
    lslr = option in ("lslr", "both")
    msl = option in ("msl", "both")
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, loss=loss, first_order=first_order, lslr=lslr,
                       multi_step_loss=msl, msl_anneal_iters=10, exact_reverse=path == "exact_reverse",
                       memory=memory, fused=False)
    maml.set_iteration(3)  # weights neither uniform nor final-only
    extra = []
    if lslr:  # distinct rates per step and tensor, so a mix-up would show
        with torch.no_grad():
            maml.step_lrs.mul_(torch.rand_like(maml.step_lrs) + 0.5)
        extra = [maml.step_lrs]
    weights = maml.step_loss_weights() if msl else None
    if msl and steps > 1:
        assert weights == pytest.approx(paper_weights(3, steps, 10), abs=1e-15) and weights[0] != weights[-1]
    out = maml(*batch)
    assert used_path(maml) == path
    params = list(model.parameters()) + extra
    grads = torch.autograd.grad(out.loss, params)
    ref = per_task_maml(model, *batch, lr, steps, first_order, loss,
                        step_lrs=lslr_reference_rates(maml) if lslr else None, step_weights=weights)
    ref_grads = torch.autograd.grad(ref, params)
    assert abs(out.loss.item() - ref.item()) <= TOL * abs(ref.item())
    err = rel_err(flat(grads), flat(ref_grads))
    assert err <= TOL, f"meta-gradient rel. err {err:.2e}"
    if lslr:  # the learned rates get a real gradient, one per step and tensor
        assert rel_err(grads[-1], ref_grads[-1]) <= TOL and (grads[-1] != 0).all()


def test_lslr_init_and_per_step_list():
    model, batch, loss = make("mlp")
    maml = BatchedMAML(model, inner_lr=[0.1, 0.2], inner_steps=2, loss=loss, lslr=True)
    assert maml.step_lrs.shape == (2, 6) and isinstance(maml.step_lrs, torch.nn.Parameter)
    assert torch.equal(maml.step_lrs[0], torch.full((6,), 0.1, dtype=DT))
    assert torch.equal(maml.step_lrs[1], torch.full((6,), 0.2, dtype=DT))
    # at init LSLR equals the plain per-step rates
    plain = BatchedMAML(make("mlp")[0], inner_lr=[0.1, 0.2], inner_steps=2, loss=loss, exact_reverse=False)
    with torch.no_grad():
        for p, q in zip(plain.module.parameters(), model.parameters()):
            p.copy_(q)
    assert torch.allclose(maml(*batch).loss, plain(*batch).loss, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="inner_steps"):
        maml(*batch, inner_steps=3)


@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("n", [1, 3, 15])
def test_msl_weights_match_paper_code(K, n):
    for it in range(0, 2 * n + 3):
        assert msl_weights(it, K, n) == pytest.approx(paper_weights(it, K, n), abs=1e-15)
        w = step_loss_weights(it, K, n)
        if it < n:
            assert w == msl_weights(it, K, n)
        else:  # the paper's code uses only the last step's loss after its annealing epochs
            assert w == [0.0] * (K - 1) + [1.0]
    assert msl_weights(0, K, n) == pytest.approx([1.0 / K] * K)
    # the floor and the ceiling
    late = msl_weights(10 * n, K, n)
    assert late[:-1] == pytest.approx([0.03 / K] * (K - 1)) and late[-1] == pytest.approx(1 - (K - 1) * 0.03 / K)


def test_msl_weights_used_follow_set_iteration():
    model, batch, loss = make("mlp")
    maml = BatchedMAML(model, inner_lr=0.1, inner_steps=3, loss=loss, multi_step_loss=True, msl_anneal_iters=4)
    losses = []
    for it in (0, 2, 4):
        maml.set_iteration(it)
        assert maml.step_loss_weights() == step_loss_weights(it, 3, 4)
        losses.append(maml(*batch).loss.item())
    ref = [per_task_maml(model, *batch, 0.1, 3, False, loss, step_weights=step_loss_weights(it, 3, 4)).item()
           for it in (0, 2, 4)]
    assert losses == pytest.approx(ref, rel=1e-12) and len(set(losses)) == 3


def test_derivative_order_annealing_switches_and_resumes():
    assert [is_first_order(i, 3) for i in range(5)] == [True, True, True, False, False]
    model, batch, loss = make("conv4_bn")

    def grads_at(maml, it=None):
        if it is not None:
            maml.set_iteration(it)
        return flat(torch.autograd.grad(maml(*batch).loss, list(maml.module.parameters())))

    maml = BatchedMAML(model, inner_lr=0.3, inner_steps=2, loss=loss, first_order_iters=3, exact_reverse=False)
    fo = per_task_maml(model, *batch, 0.3, 2, True, loss)
    so = per_task_maml(model, *batch, 0.3, 2, False, loss)
    fo_g = flat(torch.autograd.grad(fo, list(model.parameters())))
    so_g = flat(torch.autograd.grad(so, list(model.parameters())))
    assert rel_err(fo_g, so_g) > 1e-4  # the two orders differ here
    for it in range(3):
        assert maml._setup().first_order and rel_err(grads_at(maml, it), fo_g) <= TOL
    assert rel_err(grads_at(maml, 3), so_g) <= TOL and not maml._setup().first_order
    # checkpoint before the switch, resume in a fresh module: it switches at the same iteration
    maml.set_iteration(2)
    state = maml.state_dict()
    assert int(state["iteration"]) == 2
    fresh = BatchedMAML(make("conv4_bn")[0], inner_lr=0.3, inner_steps=2, loss=loss, first_order_iters=3,
                        exact_reverse=False)
    fresh.set_iteration(7)  # second order before loading
    assert not fresh._setup().first_order
    fresh.load_state_dict(state)
    assert fresh.get_iteration() == 2 and fresh._setup().first_order
    assert rel_err(grads_at(fresh), fo_g) <= TOL
    assert rel_err(grads_at(fresh, fresh.get_iteration() + 1), so_g) <= TOL
    # and a checkpoint after the switch resumes second order
    fresh2 = BatchedMAML(make("conv4_bn")[0], inner_lr=0.3, inner_steps=2, loss=loss, first_order_iters=3,
                         exact_reverse=False)
    fresh2.load_state_dict(fresh.state_dict())
    assert fresh2.get_iteration() == 3 and rel_err(grads_at(fresh2), so_g) <= TOL


def test_preset_and_paths():
    model, batch, loss = make("conv4_bn")
    maml = metafast.MAMLpp(model, inner_steps=3)
    assert isinstance(maml, BatchedMAML) and maml.step_lrs is not None and maml.multi_step_loss
    assert maml.msl_anneal_iters == 15 and maml.first_order_iters == 50 and maml._setup().first_order
    assert maml.step_bn is not None and metafast.MAMLpp(make("mlp")[0], loss="mse").step_bn is None  # no BN
    text = maml.describe()
    assert "fused: no" in text and "per-step BatchNorm weights on (per-step running statistics: not implemented" in text
    assert "> exact_reverse: yes" in text and maml.exact_reverse
    out = maml(*batch)
    assert used_path(maml) == "exact_reverse" and torch.isfinite(out.loss)
    assert metafast.MAMLpp(make("conv4_bn")[0], per_step_bn=False).exact_reverse
    # adapt() runs with the learned rates (no graph)
    w = maml.adapt(batch[0], batch[1])
    assert w.fast.requires_grad is False and maml.predict(w, batch[2]).shape[:2] == batch[2].shape[:2]


def test_mlp_fused_candidate_does_not_fuse_maml_pp_options():
    model, batch, loss = make("mlp")
    maml = BatchedMAML(model, inner_lr=0.1, inner_steps=2, loss=loss, lslr=True)
    verdicts = {p.name: v for p, v in maml._verdicts()}
    assert not verdicts["fused"].ok and "lslr" in verdicts["fused"].reason
    assert verdicts["exact_reverse"].ok
    with pytest.raises(ValueError, match="fused=True"):
        BatchedMAML(make("mlp")[0], inner_steps=2, loss=loss, multi_step_loss=True, fused=True)


@pytest.mark.parametrize("kw,match", [
    (dict(msl_anneal_iters=-1, multi_step_loss=True), "msl_anneal_iters"),
    (dict(msl_anneal_iters=2.5), "msl_anneal_iters"),
    (dict(first_order_iters=-3), "first_order_iters"),
    (dict(lslr=True, meta_sgd=True), "lslr"),
])
def test_bad_input_names_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        BatchedMAML(make("mlp")[0], inner_steps=2, **kw)


def test_bad_iteration():
    maml = BatchedMAML(make("mlp")[0], inner_steps=2, first_order_iters=2)
    for bad in (-1, 1.5, "3"):
        with pytest.raises(ValueError, match="iteration"):
            maml.set_iteration(bad)
    with pytest.raises(ValueError, match="anneal_iters"):
        msl_weights(0, 3, -2)
    with pytest.raises(ValueError, match="steps"):
        msl_weights(0, 0, 2)


def test_vision_job_mamlpp_resumes_across_the_derivative_order_switch(cifar_root, tmp_path, one_thread,
                                                                      monkeypatch):
    """`metafast train --algorithm mamlpp`: MAML++ with short schedules (first order for 2 of 4 iterations),
    cut at iteration 2 and resumed, equals the straight run (weights, rates, counter, history)."""
    from metafast.jobs import vision
    from metafast.runtime.checkpoint import load_checkpoint

    monkeypatch.setitem(vision.MAMLPP_SCHEDULE, "msl_anneal_iters", 3)
    monkeypatch.setitem(vision.MAMLPP_SCHEDULE, "first_order_iters", 2)
    cfg = vision.VisionConfig(dataset="cifarfs", root=cifar_root, meta_batch=2, width=4, queries=1, eval_queries=1,
                              iterations=4, inner_steps=2, val_every=2, val_episodes=2, eval_episodes=2,
                              checkpoint_every=0, device="cpu", algorithm="mamlpp")
    quiet = dict(progress=False, log=lambda s: None, plot=False)
    vision.train_vision(cfg, str(tmp_path / "straight"), **quiet)

    def ctrl_c(iteration):
        if iteration == 2:
            raise KeyboardInterrupt

    with pytest.raises(vision.TrainingInterrupted):
        vision.train_vision(cfg, str(tmp_path / "cut"), callback=ctrl_c, **quiet)
    cut = load_checkpoint(str(tmp_path / "cut"))
    assert int(cut["maml"]["iteration"]) == 1  # the last step ran first order
    vision.train_vision(cfg, str(tmp_path / "cut"), resume=True, **quiet)
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "cut"))
    assert int(a["maml"]["iteration"]) == 3 and "step_lrs" in a["maml"]
    assert not torch.equal(a["maml"]["step_lrs"], torch.full_like(a["maml"]["step_lrs"], 0.5))  # learned
    for k in a["maml"]:
        assert torch.equal(a["maml"][k], b["maml"][k]), k
    assert a["history"] == b["history"]
    lr = a["optimizer"]["param_groups"][0]["lr"]  # the cosine schedule's value at the last iteration (3 of 4)
    assert lr == pytest.approx(1e-5 + (3e-3 - 1e-5) * (1 + math.cos(math.pi * 3 / 4)) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="algorithm"):
        vision.VisionConfig(dataset="cifarfs", algorithm="reptile").resolved()


def test_train_parser_takes_algorithm():
    from metafast import cli

    args = cli.build_parser().parse_args(["train", "--dataset", "omniglot", "--algorithm", "mamlpp"])
    assert args.algorithm == "mamlpp"
    assert cli.build_parser().parse_args(["train", "--dataset", "omniglot"]).algorithm is None  # the config's


def test_task_chunks_and_step_checkpointing_give_the_same_meta_gradient():
    model, batch, loss = make("conv4_bn")
    grads = []
    for memory, chunk in (("fast", None), ("low", 2), ("fast", 1)):
        maml = BatchedMAML(model, inner_lr=0.3, inner_steps=3, loss=loss, lslr=True, multi_step_loss=True,
                           msl_anneal_iters=10, memory=memory, task_chunk=chunk)
        maml.set_iteration(2)
        with torch.no_grad():
            maml.step_lrs.mul_(torch.linspace(0.5, 1.5, maml.step_lrs.numel(), dtype=DT).view_as(maml.step_lrs))
        out = maml(*batch)
        assert used_path(maml) == "exact_reverse"
        grads.append(flat(torch.autograd.grad(out.loss, list(model.parameters()) + [maml.step_lrs])))
    assert rel_err(grads[1], grads[0]) <= TOL and rel_err(grads[2], grads[0]) <= TOL


def step_bn_reference(maml):
    """per_step_bn's rows as the reference takes them: per step, BatchNorm parameter name -> view of step_bn."""
    from metafast.functional.layers import BatchNorm
    slots = [s for layer in maml._engine.layers if isinstance(layer, BatchNorm) for s in layer.slots]
    out = []
    for k in range(maml.step_bn.shape[0]):
        row, at = {}, 0
        for s in slots:
            row[s.name] = maml.step_bn[k, at:at + s.numel].view(s.shape)
            at += s.numel
        out.append(row)
    return out


def meta_sgd_reference_rates(maml):
    """Meta-SGD's rates as the reference takes them: parameter name -> view of lrs."""
    return {s.name: maml.lrs[s.offset:s.offset + s.numel].view(s.shape) for s in maml._flat.slots}


PATHS = {"autograd": dict(exact_reverse=False), "exact_reverse": dict(),
         "exact_reverse_low_chunks": dict(memory="low", task_chunk=3)}


@pytest.mark.parametrize("kind", ["mlp_bn", "conv4_bn"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("others", ["none", "lslr_msl", "meta_sgd"])
@pytest.mark.parametrize("path", list(PATHS))
def test_per_step_bn_matches_per_task_reference(kind, steps, first_order, others, path):
    torch.manual_seed(0)
    model, batch, loss = make(kind)
    lr = 0.1 if loss == "mse" else 0.3
    lslr_msl = others == "lslr_msl"
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, loss=loss, first_order=first_order, per_step_bn=True,
                       lslr=lslr_msl, multi_step_loss=lslr_msl, msl_anneal_iters=10, meta_sgd=others == "meta_sgd",
                       fused=False, **PATHS[path])
    maml.set_iteration(3)
    with torch.no_grad():  # distinct BatchNorm weights per step (and rates), so a mix-up would show
        maml.step_bn.mul_(torch.rand_like(maml.step_bn) + 0.5)
        if others == "meta_sgd":
            maml.lrs.mul_(torch.rand_like(maml.lrs) + 0.5)
    extra = [maml.step_bn] + ([maml.step_lrs] if lslr_msl else [maml.lrs] if others == "meta_sgd" else [])
    out = maml(*batch)
    assert used_path(maml) == path.split("_low")[0]
    assert_path(maml, fused=False, exact_reverse=path != "autograd")
    params = list(model.parameters()) + extra
    grads = torch.autograd.grad(out.loss, params)
    ref = per_task_maml(model, *batch, lr, steps, first_order, loss, step_params=step_bn_reference(maml),
                        step_lrs=lslr_reference_rates(maml) if lslr_msl else None,
                        lrs=meta_sgd_reference_rates(maml) if others == "meta_sgd" else None,
                        step_weights=maml.step_loss_weights() if lslr_msl else None)
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    ref_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, ref_grads)]
    assert abs(out.loss.item() - ref.item()) <= TOL * abs(ref.item())
    err = rel_err(flat(grads), flat(ref_grads))
    assert err <= TOL, f"meta-gradient rel. err {err:.2e}"
    n = len(list(model.parameters()))
    assert rel_err(grads[n], ref_grads[n]) <= TOL, "step_bn's meta-gradient"
    rows = grads[n].abs().sum(1)
    # every step's row learns; first order without the multi-step loss: only the last (the query pass's)
    assert (rows > 0).all() if not first_order or lslr_msl else (rows[-1] > 0 and (rows[:-1] == 0).all())


def test_per_step_bn_exact_reverse_five_steps_in_chunks():
    """K = 5 with LSLR and the multi-step loss: the step-checkpointed reverse in chunks of 3 tasks (4 tasks:
    chunks of 3 and 1) equals the unchunked reverse, autograd and the per-task reference."""
    model, batch, loss = make("conv4_bn")
    grads = {}
    for name, kw in PATHS.items():
        maml = BatchedMAML(model, inner_lr=0.3, inner_steps=5, loss=loss, per_step_bn=True, lslr=True,
                           multi_step_loss=True, msl_anneal_iters=10, fused=False, **kw)
        maml.set_iteration(2)
        with torch.no_grad():
            maml.step_bn.copy_(torch.linspace(0.5, 1.5, maml.step_bn.numel(), dtype=DT).view_as(maml.step_bn))
            maml.step_lrs.mul_(torch.linspace(0.5, 1.5, maml.step_lrs.numel(), dtype=DT).view_as(maml.step_lrs))
        params = list(model.parameters()) + [maml.step_bn, maml.step_lrs]
        grads[name] = flat(torch.autograd.grad(maml(*batch).loss, params))
        assert used_path(maml) == name.split("_low")[0]
    ref = per_task_maml(model, *batch, 0.3, 5, False, loss, step_params=step_bn_reference(maml),
                        step_lrs=lslr_reference_rates(maml), step_weights=maml.step_loss_weights())
    ref_grads = torch.autograd.grad(ref, params, allow_unused=True)
    ref_grads = flat([torch.zeros_like(p) if g is None else g for p, g in zip(params, ref_grads)])
    for name, g in grads.items():
        assert rel_err(g, ref_grads) <= TOL, name


def test_per_step_bn_adapt_and_predict():
    from torch.func import functional_call
    model, batch, loss = make("conv4_bn")
    maml = BatchedMAML(model, inner_lr=0.3, inner_steps=2, loss=loss, per_step_bn=True)
    with torch.no_grad():
        maml.step_bn.mul_(torch.rand_like(maml.step_bn) + 0.5)
    sx, sy, qx, _ = batch
    got = maml.predict(maml.adapt(sx, sy), qx)
    _, adapted = per_task_maml(model, *batch, 0.3, 2, False, loss, step_params=step_bn_reference(maml),
                               return_params=True)
    buffers = dict(model.named_buffers())
    ref = torch.stack([functional_call(model, {**adapted[t], **buffers}, (qx[t],)) for t in range(qx.shape[0])])
    assert rel_err(got, ref.detach()) <= TOL
    with pytest.raises(ValueError, match="per_step_bn"):
        BatchedMAML(make("mlp")[0], per_step_bn=True)  # no BatchNorm
    with pytest.raises(ValueError, match="per_step_bn"):
        BatchedMAML(make("conv4_bn")[0], per_step_bn=True, anil=True)


def test_lslr_and_msl_with_anil_match_the_reference():
    """ANIL: LSLR holds rates for the head's tensors only."""
    model, batch, loss = make("conv4_bn")
    maml = BatchedMAML(model, inner_lr=0.3, inner_steps=2, loss=loss, lslr=True, anil=True, multi_step_loss=True,
                       msl_anneal_iters=5)
    maml.set_iteration(1)
    with torch.no_grad():
        maml.step_lrs.mul_(torch.rand_like(maml.step_lrs) + 0.5)
    assert maml.step_lrs.shape == (2, 2)  # the head's weight and bias
    names = [s.name for s in maml._flat.slots[maml._engine._first_adapted_slot:]]
    params = list(model.parameters()) + [maml.step_lrs]
    grads = torch.autograd.grad(maml(*batch).loss, params)
    assert used_path(maml) == "autograd"
    ref = per_task_maml(model, *batch, 0.3, 2, False, loss, head_names=names, step_lrs=lslr_reference_rates(maml),
                        step_weights=maml.step_loss_weights())
    assert rel_err(flat(grads), flat(torch.autograd.grad(ref, params))) <= TOL
