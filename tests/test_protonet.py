"""ProtoNet: the batched pass (one embedding forward over T episodes, segment-mean prototypes, one
batched distance) against the per-episode float64 loop ``reference_logits``; BatchNorm semantics of
batchnorm="episode" / "batch"; the training step and the 600-episode style evaluation; bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metafast
from metafast.algorithms import protonet as P
from metafast.data.episodes import EpisodeSampler, ImageSplit
from metafast.models import Conv4

TOL = 1e-10


def conv4_embedding(bn: str = "transductive", hidden: int = 8, size: int = 13) -> nn.Sequential:
    """Conv4 without its head (stride 2, odd image side); bn: "transductive" (Conv4's BN: batch
    statistics always), "running" (track_running_stats=True) or "none"."""
    body = list(Conv4(2, in_channels=1, hidden=hidden, image_size=size, stride=2, pool=False))[:-1]
    layers = []
    for m in body:
        if isinstance(m, nn.BatchNorm2d):
            if bn == "none":
                continue
            if bn == "running":
                m = nn.BatchNorm2d(m.num_features)
        layers.append(m)
    emb = nn.Sequential(*layers)
    with torch.no_grad():  # non-trivial affine BN parameters and running statistics
        for m in emb.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
    return emb


def mlp_embedding(features: int = 7) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 11), nn.Tanh(), nn.Linear(11, 5))


def episodes(T, ways, shots, queries, shape, dtype=torch.float64, uneven=False):
    """T episodes with labels shuffled within each episode; ``uneven``: class c gets shots + c support
    samples."""
    per_class = [shots + (c if uneven else 0) for c in range(ways)]
    sy = torch.stack([torch.repeat_interleave(torch.arange(ways), torch.tensor(per_class))[torch.randperm(sum(per_class))]
                      for _ in range(T)])
    qy = torch.stack([torch.arange(ways).repeat(queries)[torch.randperm(ways * queries)] for _ in range(T)])
    sx = torch.randn(T, sy.shape[1], *shape, dtype=dtype)
    qx = torch.randn(T, qy.shape[1], *shape, dtype=dtype)
    return sx, sy, qx, qy


def reference_loss(emb, sx, sy, qx, qy, ways, distance, scale):
    logits, protos = P.reference_logits(emb, sx, sy, qx, ways, distance, scale)
    T, Q, W = logits.shape
    per_episode = torch.stack([F.cross_entropy(logits[t], qy[t]) for t in range(T)])
    return per_episode.mean(), per_episode, logits, protos


def params_and_grads(module):
    return [(n, p.grad.detach().clone()) for n, p in module.named_parameters()]


CASES = [  # (embedding kind, train mode, T, ways, shots, queries, uneven)
    ("mlp", True, 3, 3, 2, 5, True),
    ("conv4-transductive", True, 3, 5, 1, 3, False),   # train-mode BN: per-episode statistics
    ("conv4-transductive", True, 2, 3, 2, 1, True),
    ("conv4-running", False, 3, 4, 2, 2, False),       # eval mode: running statistics
    ("conv4-none", True, 1, 2, 3, 7, False),
]


def build(kind):
    if kind == "mlp":
        return mlp_embedding(), (7,)
    return conv4_embedding(kind.split("-")[1]), (1, 13, 13)


@pytest.mark.parametrize("distance", P.DISTANCES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_logits_and_gradients_equal_per_episode_reference(case, distance, assert_close):
    kind, train, T, ways, shots, queries, uneven = case
    emb, shape = build(kind)
    emb = emb.double().train(train)
    net = P.ProtoNet(emb, distance=distance, **({"scale": 3.5} if distance == "cosine" else {})).double().train(train)
    sx, sy, qx, qy = episodes(T, ways, shots, queries, shape, uneven=uneven)

    out = net(sx, sy, qx, qy)
    out.loss.mul(1.7).backward()  # grad_output != 1
    got = params_and_grads(net)
    net.zero_grad()

    scale = net.scale if distance == "cosine" else None
    loss, per_episode, logits, protos = reference_loss(emb, sx, sy, qx, qy, ways, distance, scale)
    loss.mul(1.7).backward()
    want = params_and_grads(net)

    assert_close(out.logits, logits, TOL, TOL, "logits")
    assert_close(out.prototypes, protos, TOL, TOL, "prototypes")
    assert_close(out.loss, loss, TOL, TOL, "loss")
    assert_close(out.episode_losses, per_episode, TOL, TOL, "episode_losses")
    acc = (logits.argmax(-1) == qy).double().mean(1)
    assert torch.equal(out.accuracies, acc)
    assert out.logits.shape == (T, ways * queries, ways)
    assert [n for n, _ in got] == [n for n, _ in want] and len(got) > 0
    if distance == "cosine":
        assert "scale" in dict(got)
    for (name, g), (_, w) in zip(got, want):
        assert w.abs().sum() > 0, name
        assert_close(g, w, TOL, TOL, f"grad {name}")
    assert "forward" not in vars(emb[1] if kind != "mlp" else emb[0])  # the per-episode BN forward is removed


def test_float32_matches_float64_reference(assert_close):
    emb = conv4_embedding("transductive")
    net = P.ProtoNet(emb)
    sx, sy, qx, qy = episodes(4, 5, 2, 3, (1, 13, 13), dtype=torch.float32)
    out = net(sx, sy, qx, qy)
    emb64 = conv4_embedding("transductive").double()
    emb64.load_state_dict(emb.state_dict())
    logits, _ = P.reference_logits(emb64, sx.double(), sy, qx.double(), 5)
    assert_close(out.logits, logits, 1e-3, 1e-4, "float32 logits")


def test_batch_mode_statistics_span_all_episodes(assert_close):
    """batchnorm='batch': training-mode BN normalises with the statistics of all T episodes' images,
    which differs from the per-episode reference for T > 1 and equals it for T = 1."""
    emb = conv4_embedding("transductive").double()
    sx, sy, qx, qy = episodes(3, 4, 2, 2, (1, 13, 13))
    batch = P.ProtoNet(emb, batchnorm="batch")(sx, sy, qx, qy).logits
    episode = P.ProtoNet(emb, batchnorm="episode")(sx, sy, qx, qy).logits
    per_episode, _ = P.reference_logits(emb, sx, sy, qx, 4)
    assert_close(episode, per_episode, TOL, TOL, "episode mode")
    assert (batch - per_episode).abs().max() > 1e-3  # the statistics really differ

    # the batch-mode oracle: one embedding pass over every image, then per-episode prototypes
    T, S, Q = sx.shape[0], sx.shape[1], qx.shape[1]
    e = emb(torch.cat([sx.flatten(0, 1), qx.flatten(0, 1)])).flatten(1)
    s, q = e[:T * S].view(T, S, -1), e[T * S:].view(T, Q, -1)
    protos = torch.stack([torch.stack([s[t][sy[t] == c].mean(0) for c in range(4)]) for t in range(T)])
    want = -((q.unsqueeze(2) - protos.unsqueeze(1)) ** 2).sum(-1)
    assert_close(batch, want, TOL, TOL, "batch mode")

    one = P.ProtoNet(emb, batchnorm="batch")(sx[:1], sy[:1], qx[:1], qy[:1]).logits
    assert_close(one, per_episode[:1], TOL, TOL, "batch mode, T=1")


def test_episode_mode_updates_running_statistics(assert_close):
    emb = conv4_embedding("running").double().train()
    bn = emb[1]
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    sx, sy, qx, qy = episodes(3, 3, 2, 2, (1, 13, 13))
    P.ProtoNet(emb)(sx, sy, qx, qy)
    # the first BN's input of each episode: the first conv's output over its support + query images
    x = torch.stack([emb[0](torch.cat([sx[t], qx[t]])) for t in range(3)])  # [T, N, C, H, W]
    mean = x.mean((1, 3, 4)).mean(0)
    var = x.var((1, 3, 4), unbiased=True).mean(0)
    m = bn.momentum
    assert_close(bn.running_mean, (1 - m) * rm0 + m * mean, TOL, TOL, "running_mean")
    assert_close(bn.running_var, (1 - m) * rv0 + m * var, TOL, TOL, "running_var")
    assert int(bn.num_batches_tracked) == 1
    assert "forward" not in vars(bn)


def test_train_and_test_settings_differ_with_episode_sampler(monkeypatch):
    """Training on 10-way 2-shot episodes from EpisodeSampler and evaluating on fixed 5-way 1-shot
    ones: train_step learns (the mean training loss falls), evaluate reports the mean accuracy and
    the 95% CI over exactly the requested episodes."""
    g = torch.Generator().manual_seed(1)
    classes, per_class = 30, 8
    centres = torch.randint(0, 256, (classes, 1, 6, 6), generator=g).float()
    noise = torch.randn(classes, per_class, 1, 6, 6, generator=g) * 60
    images = (centres.unsqueeze(1) + noise).clamp(0, 255).to(torch.uint8).flatten(0, 1)
    split = ImageSplit(images, torch.arange(classes).repeat_interleave(per_class), [str(c) for c in range(classes)])
    train = EpisodeSampler(split, ways=10, shots=2, queries=3, seed=0)
    test = EpisodeSampler(split, ways=5, shots=1, queries=4, seed=0)

    net = metafast.ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 16)))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    scopes = []
    real_scope = P.cpu_cache.scope
    monkeypatch.setattr(P.cpu_cache, "scope", lambda device="cpu": scopes.append(torch.device(device)) or real_scope(device))
    losses = [P.train_step(net, opt, train.sample(8)).loss.item() for _ in range(30)]
    assert scopes == [torch.device("cpu")] * 30  # each step ran in the CPU block cache
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses

    res = net.evaluate(test.fixed_episodes(count=60, batch=25))
    assert res["episodes"] == 60 and len(res["per_episode"]) == 60
    accs = torch.tensor(res["per_episode"], dtype=torch.float64)
    assert math.isclose(res["accuracy"], accs.mean().item(), rel_tol=1e-12)
    assert math.isclose(res["ci95"], 1.96 * accs.std().item() / math.sqrt(60), rel_tol=1e-12)
    assert res["accuracy"] > 0.5  # chance is 0.2
    # the same episodes, one batch: the same accuracies (nothing depends on the batching)
    direct = []
    for ep in test.fixed_episodes(count=60, batch=60):
        direct = (net.predict(ep.support_x, ep.support_y, ep.query_x).argmax(-1) == ep.query_y).double().mean(1)
    assert torch.equal(direct, accs)
    # a sampler: its fixed evaluation set (600 episodes by default; here 60)
    assert net.evaluate(test, count=60, batch=7)["per_episode"] == res["per_episode"]
    assert net.training  # evaluate restores the mode


def test_cosine_scale_learnable_or_fixed():
    emb = mlp_embedding()
    learned = P.ProtoNet(emb, distance="cosine")
    assert isinstance(learned.scale, nn.Parameter) and learned.scale.item() == 10.0
    fixed = P.ProtoNet(emb, distance="cosine", scale=4.0, learn_scale=False)
    assert not isinstance(fixed.scale, nn.Parameter) and "scale" in dict(fixed.named_buffers())
    sx, sy, qx, qy = episodes(2, 3, 1, 2, (7,), dtype=torch.float32)
    logits = fixed(sx, sy, qx, qy).logits
    assert logits.abs().max() <= 4.0 + 1e-5 and logits.abs().max() > 0.5


# -- bad input --------------------------------------------------------------------------------------
def _batch():
    return episodes(2, 3, 2, 2, (7,), dtype=torch.float32)


@pytest.mark.parametrize("kwargs, match", [
    (dict(distance="manhattan"), "distance: expected one of"),
    (dict(batchnorm="task"), "batchnorm: expected one of"),
    (dict(scale=2.0), "scale: only the cosine distance"),
    (dict(distance="cosine", scale=0.0), "scale: expected a finite number > 0"),
    (dict(distance="cosine", scale=float("nan")), "scale: expected a finite number > 0"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.ProtoNet(mlp_embedding(), **kwargs)
    with pytest.raises(TypeError, match="embedding: expected an nn.Module"):
        P.ProtoNet(lambda x: x)


def _mutate(which):
    sx, sy, qx, qy = _batch()
    kw = {}
    if which == "support_label_range":
        sy[1, 0] = 5
        kw["ways"] = 3
    elif which == "negative_label":
        sy[0, 0] = -1
    elif which == "query_label_range":
        qy[0, 1] = 3
    elif which == "empty_class":
        sy[1] = torch.tensor([0, 0, 2, 2, 0, 2])
    elif which == "episodes":
        qx, qy = qx[:1], qy[:1]
    elif which == "features":
        qx = torch.randn(2, 6, 8)
    elif which == "label_shape":
        sy = sy[:, :5]
    elif which == "float_labels":
        qy = qy.float()
    elif which == "images_dim":
        sx = sx[:, :, 0]
    elif which == "no_queries":
        qx, qy = qx[:, :0], qy[:, :0]
    elif which == "ways":
        kw["ways"] = 0
    elif which == "dtype":
        qx = qx.double()
    elif which == "query_y":
        qy = None
    return (sx, sy, qx, qy), kw


@pytest.mark.parametrize("which, match", [
    ("support_label_range", r"support_y: expected labels in \[0, 3\)"),
    ("negative_label", r"support_y: expected labels in \[0, 3\)"),
    ("query_label_range", r"query_y: expected labels in \[0, 3\)"),
    ("empty_class", "support_y: episode 1 has no support sample of class 1"),
    ("episodes", "query_x: expected 2 episodes"),
    ("features", r"query_x: expected samples of shape \[7\]"),
    ("label_shape", r"support_y: expected shape \[2, 6\]"),
    ("float_labels", "query_y: expected an integer tensor"),
    ("images_dim", r"support_x: expected a floating tensor \[T, N, \*features\]"),
    ("no_queries", "query_x: expected at least one query sample"),
    ("ways", "ways: expected an int >= 1"),
    ("dtype", "query_x: expected torch.float32"),
    ("query_y", "query_y: expected the query labels"),
])
def test_bad_batches_name_the_argument(which, match):
    net = P.ProtoNet(mlp_embedding())
    args, kw = _mutate(which)
    with pytest.raises(ValueError, match=match):
        net(*args, **kw)


def test_embedding_that_changes_the_batch_is_named():
    class Pairs(nn.Module):  # merges pairs of samples: the batch shrinks
        def forward(self, x):
            return x.reshape(x.shape[0] // 2, -1)

    sx, sy, qx, qy = _batch()
    with pytest.raises(RuntimeError, match=r"embedding: expected an output \[24, \.\.\.\]"):
        P.ProtoNet(Pairs())(sx, sy, qx, qy)
    class DropFirst(nn.Module):  # 24 rows in, 23 out: no longer a whole number of episodes
        def forward(self, x):
            return x[1:]

    emb = nn.Sequential(DropFirst(), nn.BatchNorm1d(7))
    with pytest.raises(RuntimeError, match="batchnorm='episode': BatchNorm1d got a batch of 23 rows, not a multiple of the 2"):
        P.ProtoNet(emb)(sx, sy, qx, qy)
    assert "forward" not in vars(emb[1])  # removed on the error path too
