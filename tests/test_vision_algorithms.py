"""`metafast train --algorithm maml|fomaml|metasgd|anil|mamlpp|protonet` and `metafast eval` on the
CIFAR-FS fixture: the learner each name builds (and trains with), protonet's training ways/shots,
evaluation through the one entry point, exact resume, and the errors for options that do not fit."""
import json

import pytest
import torch

from metafast import BatchedMAML, ProtoNet, cli
from metafast.algorithms.protonet import reference_logits
from metafast.data.episodes import EpisodeSampler
from metafast.jobs import vision
from metafast.jobs.vision_algorithms import embedding_of
from metafast.models.resnet12 import ResNet12
from metafast.runtime.checkpoint import load_checkpoint
from test_vision_train import cifar_root, one_thread  # noqa: F401  (fixtures: 64/16/20 classes of 6 images)

QUIET = dict(progress=False, log=lambda s: None, plot=False)
TINY = ["--meta-batch", "2", "--width", "4", "--queries", "1", "--eval-queries", "1", "--device", "cpu",
        "--no-progress", "--val-every", "0"]
# the BatchedMAML flags each MAML-family name must set: (first_order, meta_sgd, anil, lslr)
FLAGS = {"maml": (False, False, False, False), "fomaml": (True, False, False, False),
         "metasgd": (False, True, False, False), "anil": (False, False, True, False),
         "mamlpp": (False, False, False, True)}


def config(cifar_root, **kw):
    base = dict(dataset="cifarfs", root=cifar_root, meta_batch=2, width=4, queries=1, eval_queries=1, iterations=2,
                val_every=0, eval_episodes=6, checkpoint_every=0, device="cpu")
    if kw.get("algorithm") != "protonet":
        base["inner_steps"] = 1
    return vision.VisionConfig(**{**base, **kw})


def record_episodes(monkeypatch):
    """Every episode batch the samplers assemble: (sampler ways, support size, query size, labels seen)."""
    seen = []
    assemble = EpisodeSampler.assemble

    def spy(self, idx, classes):
        ep = assemble(self, idx, classes)
        seen.append((self.ways, ep.support_x.shape[1], ep.query_x.shape[1], int(ep.support_y.max()) + 1))
        return ep

    monkeypatch.setattr(EpisodeSampler, "assemble", spy)
    return seen


@pytest.mark.parametrize("algorithm", sorted(FLAGS))
def test_maml_family_builds_its_learner_trains_and_evaluates(algorithm, cifar_root, tmp_path, one_thread, capsys):
    job = vision.VisionJob(config(cifar_root, algorithm=algorithm), str(tmp_path / "run"), **QUIET)
    metrics = job.run()
    learner = job.learner
    assert type(learner) is BatchedMAML
    assert (learner.first_order, learner.meta_sgd, learner.anil, learner.step_lrs is not None) == FLAGS[algorithm]
    assert job.config.algorithm == metrics["algorithm"] == algorithm and metrics["inner_steps"] == 1
    state = load_checkpoint(str(tmp_path / "run"))["maml"]
    if algorithm == "metasgd":  # the learned rates were trained
        assert not torch.equal(state["lrs"], torch.full_like(state["lrs"], 0.5))
    # `metafast eval` goes through the same evaluation: same episodes, same accuracies, the algorithm named
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(tmp_path / "run"), "--episodes", "6", "--device", "cpu", "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["algorithm"] == algorithm and again["per_episode_accuracy"] == metrics["per_episode_accuracy"]
    assert capsys.readouterr().out.startswith(f"{algorithm} cifarfs test: 5-way 1-shot accuracy")


def test_protonet_trains_on_its_own_ways_and_tests_on_the_others(cifar_root, tmp_path, one_thread, monkeypatch,
                                                                 capsys):
    seen = record_episodes(monkeypatch)
    cfg = config(cifar_root, algorithm="protonet", train_ways=10, train_shots=2, queries=2, shots=1, eval_queries=3)
    job = vision.VisionJob(cfg, str(tmp_path / "run"), **QUIET)
    metrics = job.run()
    assert type(job.learner) is ProtoNet and job.learner.distance == "euclidean"
    assert (job.sampler.ways, job.sampler.shots, job.sampler.queries) == (10, 2, 2)
    train, test = seen[:2], seen[2:]  # 2 iterations, then the 6 test episodes in one batch
    assert train == [(10, 20, 20, 10)] * 2 and test == [(5, 5, 15, 5)]
    assert metrics["algorithm"] == "protonet" and metrics["ways"] == 5 and metrics["inner_steps"] is None
    assert metrics["config"]["inner_lr"] is None  # the MAML preset's inner loop does not apply
    state = load_checkpoint(str(tmp_path / "run"))["maml"]
    # Conv4 without its classifier: 4 blocks of conv/BN/ReLU/pool, then Flatten (16); the Linear (17) is gone
    assert all(k.startswith("embedding.") for k in state) and "embedding.12.weight" in state
    assert not any(k.startswith("embedding.17.") for k in state)
    # the accuracies are those of the per-episode prototype reference on the same fixed episodes
    sampler = vision.make_sampler(job.config, vision.load_data("cifarfs", cifar_root, "test"), "test", "cpu")
    net = ProtoNet(embedding_of(vision.build_model(job.config)).to(torch.float64))
    net.load_state_dict(state)
    net.eval()
    want = []
    for ep in sampler.fixed_episodes(count=6, batch=50):
        with torch.no_grad():
            logits, _ = reference_logits(net.embedding, ep.support_x.double(), ep.support_y, ep.query_x.double(), 5)
        want += (logits.argmax(-1) == ep.query_y).double().mean(1).tolist()
    assert metrics["per_episode_accuracy"] == want
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "run"), "--episodes", "6", "--device", "cpu",
                     "--out", str(tmp_path / "m.json")]) == 0
    assert "protonet cifarfs test: 5-way 1-shot accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["per_episode_accuracy"] == want


def test_protonet_through_the_cli_on_resnet12_with_cosine(cifar_root, tmp_path, one_thread):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "cifarfs", "--root", cifar_root, "--out", str(out), "--iterations", "1",
                     "--algorithm", "protonet", "--model", "resnet12", "--distance", "cosine", "--train-ways", "7",
                     "--meta-batch", "1", "--eval-episodes", "2"] + TINY[2:]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["algorithm"] == "protonet" and m["config"]["train_ways"] == 7 and m["config"]["distance"] == "cosine"
    state = load_checkpoint(str(out))["maml"]
    assert "scale" in state and state["embedding.3.conv3.weight"].shape[0] == 640  # ResNet-12's last block
    net = embedding_of(ResNet12(5, image_size=32))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 640)


@pytest.mark.parametrize("options", [["--algorithm", "protonet", "--train-ways", "8"],
                                     ["--algorithm", "metasgd", "--first-order"]])
def test_resume_keeps_the_algorithm_and_is_exact(options, cifar_root, tmp_path, one_thread, capsys):
    """Trained 2 iterations, then resumed to 4 without repeating the algorithm's options, equals 4 straight."""
    common = ["--dataset", "cifarfs", "--root", cifar_root, "--val-every", "2", "--val-episodes", "3",
              "--eval-episodes", "3", "--checkpoint-every", "0"] + TINY[:-2]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert cli.main(["train", "--out", straight, "--iterations", "4"] + options + common) == 0
    assert cli.main(["train", "--out", split, "--iterations", "2"] + options + common) == 0
    assert cli.main(["train", "--resume", split, "--iterations", "4"] + common) == 0
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["config"] == b["config"] and b["config"]["algorithm"] == options[1] and a["iteration"] == b["iteration"] == 4
    for k in a["maml"]:
        assert torch.equal(a["maml"][k], b["maml"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["sampler"]["generator"].equal(b["sampler"]["generator"])
    assert a["history"] == b["history"] and a["best"] == b["best"]
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "split"))
    assert ma["per_episode_accuracy"] == mb["per_episode_accuracy"]
    capsys.readouterr()
    assert cli.main(["train", "--resume", split, "--iterations", "5", "--algorithm", "maml"] + common) == 2
    assert "algorithm" in capsys.readouterr().err  # the algorithm is fixed on resume


def test_algorithm_names_and_flags_resolve():
    resolve = lambda **kw: vision.VisionConfig(dataset="cifarfs", **kw).resolved()  # noqa: E731
    assert resolve().algorithm == "maml"
    fo = resolve(first_order=True)  # the older spelling names its variant
    assert (fo.algorithm, fo.first_order) == ("fomaml", True)
    ms = resolve(meta_sgd=True, first_order=True)
    assert (ms.algorithm, ms.meta_sgd, ms.first_order) == ("metasgd", True, True)
    assert resolve(algorithm="fomaml").first_order and resolve(algorithm="metasgd").meta_sgd
    an = resolve(algorithm="anil", first_order=True, meta_sgd=True)  # first-order ANIL with Meta-SGD head rates
    assert (an.algorithm, an.first_order, an.meta_sgd) == ("anil", True, True)
    pn = resolve(algorithm="protonet", ways=5, shots=5)
    assert (pn.train_ways, pn.train_shots, pn.inner_lr, pn.inner_steps, pn.test_inner_steps) == (5, 5, None, None, None)
    assert pn.distance == "euclidean" and resolve(algorithm="protonet", distance="cosine").distance == "cosine"
    with pytest.raises(ValueError, match="distance"):
        resolve(algorithm="protonet", distance="manhattan")
    # checkpoints written before the variants had names: "maml" + a flag
    old = vision.VisionConfig.from_dict({**resolve().to_dict(), "first_order": True, "algorithm": "maml"})
    assert old.algorithm == "fomaml"


@pytest.mark.parametrize("options,names", [
    (["--algorithm", "reptile"], ["--algorithm", "invalid choice"]),
    (["--algorithm", "protonet", "--inner-lr", "0.1"], ["inner_lr", "--inner-lr", "protonet"]),
    (["--algorithm", "protonet", "--inner-steps", "2"], ["--inner-steps"]),
    (["--algorithm", "protonet", "--test-inner-steps", "2"], ["--test-inner-steps"]),
    (["--algorithm", "protonet", "--meta-sgd"], ["--meta-sgd", "protonet"]),
    (["--algorithm", "protonet", "--first-order"], ["--first-order", "protonet"]),
    (["--algorithm", "protonet", "--memory", "low"], ["--memory"]),
    (["--algorithm", "maml", "--first-order"], ["--first-order", "fomaml"]),
    (["--algorithm", "fomaml", "--meta-sgd"], ["--meta-sgd", "--algorithm metasgd --first-order"]),
    (["--algorithm", "mamlpp", "--meta-sgd"], ["--meta-sgd", "LSLR"]),
    (["--algorithm", "anil", "--train-ways", "10"], ["train_ways", "--train-ways", "protonet"]),
    (["--algorithm", "maml", "--distance", "cosine"], ["--distance", "protonet"]),
    (["--algorithm", "protonet", "--train-ways", "70"], ["train_ways", "64 classes", "70-way"]),
    (["--algorithm", "protonet", "--train-shots", "5", "--queries", "2"], ["train_shots + queries", "6 images"]),
    (["--algorithm", "protonet", "--ways", "20"], ["ways", "cifarfs/val has 16 classes"]),
])
def test_bad_options_name_the_argument_before_anything_is_written(options, names, cifar_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "cifarfs", "--root", cifar_root, "--out", str(out), "--iterations", "1",
            "--val-every", "1", "--no-progress", "--device", "cpu"]
    assert cli.main(args + options) == 2
    err = capsys.readouterr().err
    for name in names:
        assert name in err, (name, err)
    assert not out.exists()


def test_eval_refuses_steps_for_protonet(cifar_root, tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--dataset", "cifarfs", "--root", cifar_root, "--out", str(out), "--iterations", "1",
                     "--algorithm", "protonet", "--eval-episodes", "2"] + TINY) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(out), "--steps", "3", "--device", "cpu"]) == 2
    assert "--steps" in capsys.readouterr().err



def test_maml_evaluation_runs_in_eval_mode_and_restores_training(cifar_root, one_thread):
    """MAML++'s per-step running statistics (and Dropout's eval behaviour) apply only in eval mode, so the
    job's evaluation adapts and predicts with the learner in eval mode, then puts training mode back."""
    from metafast.data.episodes import EVAL_SEED
    from metafast.jobs.vision_algorithms import build_learner, evaluate

    c = config(cifar_root, algorithm="mamlpp").resolved()
    torch.manual_seed(0)
    learner, _ = build_learner(c, vision.build_model(c), torch.device("cpu"))
    assert learner._step_stats is not None  # the preset keeps per-step running statistics
    with torch.no_grad():  # statistics far from any batch's, so that using them changes the predictions
        learner.step_running_mean.uniform_(-2, 2)
        learner.step_running_var.uniform_(0.1, 4)
    modes = []
    adapt = learner.adapt

    def spy(*args, **kw):
        modes.append(learner.training)
        return adapt(*args, **kw)

    learner.adapt = spy
    sampler = EpisodeSampler(vision.load_data("cifarfs", cifar_root, "test"), c.ways, c.shots, 1, device="cpu")
    out = evaluate(learner, sampler, episodes=6, steps=1)
    assert modes and not any(modes) and learner.training

    def by_hand(train_mode):
        learner.train(train_mode)
        accs = []
        for ep in sampler.fixed_episodes(count=6, batch=50, seed=EVAL_SEED):
            fast = adapt(ep.support_x, ep.support_y, steps=1)
            with torch.no_grad():
                logits = learner.predict(fast, ep.query_x)
            accs.append(logits)
        return torch.cat(accs)

    eval_logits, train_logits = by_hand(False), by_hand(True)
    assert not torch.allclose(eval_logits, train_logits)  # the statistics matter here
    ys = torch.cat([ep.query_y for ep in sampler.fixed_episodes(count=6, batch=50, seed=EVAL_SEED)])
    expected = (eval_logits.argmax(-1) == ys).double().mean(1)
    assert out["per_episode"] == expected.tolist()
