"""ResNet-12 through BatchedMAML (against a per-task autograd loop) and the few-shot vision job:
`metafast train --dataset ...` on tiny fixtures, best-checkpoint keeping, exact resume, `metafast eval`."""
import dataclasses
import importlib.util
import json

import pytest
import torch

from maml_reference import per_task_maml
from metafast import BatchedMAML
from metafast.models.resnet12 import ResNet12

DT = torch.float64


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ----------------------------------------------------------------------------- ResNet-12
@pytest.fixture
def one_thread():
    # 2 threads stall when the CI machine is shared; these models are far too small to need them
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_resnet12_shapes_and_structure():
    m = ResNet12(5, in_channels=3, widths=(3, 4, 5, 6), image_size=33)
    y = m(torch.randn(2, 3, 33, 33))
    assert y.shape == (2, 5)
    big = ResNet12.miniimagenet(5)
    convs = [mod for mod in big.modules() if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) == 12 and [c.out_channels for c in convs[2::3]] == [64, 160, 320, 640]
    assert all(isinstance(mod.act, torch.nn.LeakyReLU) and mod.act.negative_slope == 0.1 for mod in list(big)[:4])
    flat = ResNet12(3, in_channels=1, widths=(2, 2, 2, 2), image_size=32, avg_pool=False)
    assert flat[-1].in_features == 2 * 2 * 2
    with pytest.raises(ValueError, match="image_size"):
        ResNet12(5, image_size=15)
    with pytest.raises(ValueError, match="widths"):
        ResNet12(5, widths=(1, 2, 3))


@pytest.mark.parametrize("first_order,steps", [(False, 2), (True, 1)])
def test_resnet12_meta_gradients_match_per_task_loop(first_order, steps, one_thread):
    torch.manual_seed(0)
    model = ResNet12(3, in_channels=2, widths=(2, 3, 2, 3), image_size=17).to(DT)  # odd size: 17 -> 8 -> 4 -> 2 -> 1
    g = torch.Generator().manual_seed(4)
    T, S, Q = 2, 3, 2
    sx = torch.randn(T, S, 2, 17, 17, generator=g, dtype=DT)
    qx = torch.randn(T, Q, 2, 17, 17, generator=g, dtype=DT)
    sy = torch.randint(0, 3, (T, S), generator=g)
    qy = torch.randint(0, 3, (T, Q), generator=g)
    lr = 0.3
    maml = BatchedMAML(model, inner_lr=lr, inner_steps=steps, first_order=first_order, loss="cross_entropy")
    out = maml(sx, sy, qx, qy)
    params = list(model.parameters())
    grads = torch.autograd.grad(out.loss * 1.7, params)  # grad_output != 1
    ref_loss = per_task_maml(model, sx, sy, qx, qy, lr, steps, first_order=first_order, loss="cross_entropy")
    ref = torch.autograd.grad(ref_loss * 1.7, params)
    assert abs(out.loss.item() - ref_loss.item()) <= 1e-12 * abs(ref_loss.item())
    names = [n for n, _ in model.named_parameters()]
    for n, a, b in zip(names, grads, ref):
        assert rel_err(a, b) <= 1e-9, f"{n}: rel err {rel_err(a, b):.3g}"


# ----------------------------------------------------------------------------- the vision job
from metafast.data import cifar as cifar_mod  # noqa: E402
from metafast import cli  # noqa: E402
from metafast.jobs import vision  # noqa: E402
from metafast.runtime.checkpoint import load_checkpoint  # noqa: E402
from test_vision_data import write_cifar100  # noqa: E402

TINY = ["--meta-batch", "4", "--width", "8", "--queries", "2", "--eval-queries", "2", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A CIFAR-100 fixture (class-dependent patterns, 6 images per class) with its md5 sums trusted."""
    root = tmp_path_factory.mktemp("cifar")
    sums = write_cifar100(str(root), train_per_class=4, test_per_class=2)
    old = cifar_mod.FILES_MD5
    cifar_mod.FILES_MD5 = sums
    yield str(root)
    cifar_mod.FILES_MD5 = old


@pytest.fixture(scope="module")
def trained_run(cifar_root, tmp_path_factory):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("run") / "cifarfs"
    rc = cli.main(["train", "--dataset", "cifarfs", "--root", cifar_root, "--out", str(out), "--iterations", "200",
                      "--first-order", "--val-every", "100", "--val-episodes", "20", "--eval-episodes", "100"] + TINY)
    torch.set_num_threads(old)
    assert rc == 0
    return out


def test_training_learns_above_chance(trained_run):
    m = json.loads((trained_run / "metrics.json").read_text())
    # 5-way: chance is 20%; the fixture's classes are easy, a few hundred steps clearly learn them
    assert m["accuracy"] > 0.5, m["accuracy"]
    assert m["episodes"] == 100 and len(m["per_episode_accuracy"]) == 100
    acc = torch.tensor(m["per_episode_accuracy"], dtype=torch.float64)
    assert abs(m["accuracy"] - acc.mean().item()) < 1e-12
    assert abs(m["ci95"] - 1.96 * acc.std().item() / 10) < 1e-12 and m["ci95"] > 0
    assert m["dataset"] == "cifarfs" and m["split"] == "test" and m["ways"] == 5 and m["shots"] == 1
    assert m["config"]["inner_lr"] == 0.5 and m["config"]["inner_steps"] == 1  # the CIFAR-FS preset
    curves = json.loads((trained_run / "curves.json").read_text())
    assert [v["iteration"] for v in curves["val"]] == [100, 200]
    assert curves["train"][-1]["iteration"] == 200
    best = load_checkpoint(str(trained_run / "best.pt"))
    assert best["val"]["accuracy"] == max(v["accuracy"] for v in curves["val"])
    assert m["best_val"]["iteration"] == best["iteration"] and m["checkpoint_iteration"] == best["iteration"]
    png = (trained_run / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_eval_command_reproduces_the_final_metrics(trained_run, cifar_root, tmp_path, one_thread, capsys):
    out = tmp_path / "m.json"
    rc = cli.main(["eval", str(trained_run), "--episodes", "100", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    m, final = json.loads(out.read_text()), json.loads((trained_run / "metrics.json").read_text())
    assert m["per_episode_accuracy"] == final["per_episode_accuracy"]
    assert "accuracy" in capsys.readouterr().out
    rc = cli.main(["eval", str(trained_run / "best.pt"), "--split", "val", "--episodes", "20", "--device", "cpu",
                      "--out", str(out)])
    assert rc == 0
    val = json.loads(out.read_text())
    best = load_checkpoint(str(trained_run / "best.pt"))
    assert val["split"] == "val" and abs(val["accuracy"] - best["val"]["accuracy"]) < 1e-12


def test_resume_is_exact(cifar_root, tmp_path, one_thread):
    common = ["--dataset", "cifarfs", "--root", cifar_root, "--val-every", "2", "--val-episodes", "4",
              "--eval-episodes", "4", "--checkpoint-every", "0"] + TINY
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli.main(["train", "--out", str(straight), "--iterations", "6"] + common) == 0
    assert cli.main(["train", "--out", str(split), "--iterations", "3"] + common) == 0
    assert cli.main(["train", "--resume", str(split), "--iterations", "6"] + common) == 0
    a, b = load_checkpoint(str(straight)), load_checkpoint(str(split))
    assert a["iteration"] == b["iteration"] == 6
    for k in a["maml"]:
        assert torch.equal(a["maml"][k], b["maml"][k]), k
    assert a["sampler"]["generator"].equal(b["sampler"]["generator"])
    assert [v["accuracy"] for v in a["history"]["val"]] == [v["accuracy"] for v in b["history"]["val"]
                                                             if v["iteration"] != 3]


def test_command_errors(cifar_root, tmp_path, capsys):
    rc = cli.main(["train", "--dataset", "miniimagenet", "--root", str(tmp_path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "mini-imagenet-cache-train.pkl" in err and "metafast train: error" in err
    assert not (tmp_path / "r").exists()  # nothing written before the data is found
    rc = cli.main(["train", "--dataset", "cifarfs", "--root", cifar_root, "--ways", "70", "--out", str(tmp_path / "w")]
                     + TINY)
    assert rc == 2 and "ways" in capsys.readouterr().err
    rc = cli.main(["train", "--dataset", "cifarfs", "--train-split", "trainval", "--root", cifar_root])
    assert rc == 2 and "train_split" in capsys.readouterr().err
    rc = cli.main(["eval", str(tmp_path / "nothing")])
    assert rc == 2 and "no checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "--dataset", "imagenet"]) == 2


def test_resume_with_a_different_setup_is_refused(cifar_root, tmp_path, one_thread, capsys):
    common = ["--dataset", "cifarfs", "--root", cifar_root, "--val-every", "0", "--eval-episodes", "2"] + TINY
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--iterations", "1"] + common) == 0
    rc = cli.main(["train", "--resume", str(run), "--iterations", "2", "--shots", "2"] + common)
    assert rc == 2 and "shots" in capsys.readouterr().err


def test_presets_follow_the_papers():
    om = vision.VisionConfig(dataset="omniglot").resolved()
    assert (om.model, om.width, om.inner_lr, om.inner_steps, om.test_inner_steps, om.meta_batch, om.queries) == \
        ("conv4", 64, 0.4, 1, 3, 32, 1)
    om20 = vision.VisionConfig(dataset="omniglot", ways=20, shots=5).resolved()
    assert (om20.inner_lr, om20.inner_steps, om20.test_inner_steps, om20.meta_batch, om20.queries) == (0.1, 5, 5, 16, 5)
    mi = vision.VisionConfig(dataset="miniimagenet", shots=5).resolved()
    assert (mi.width, mi.inner_lr, mi.inner_steps, mi.test_inner_steps, mi.meta_batch, mi.queries) == \
        (32, 0.01, 5, 10, 4, 15)
    # a value the user gives wins over the preset, which fills the rest (the preset's own rate differs)
    assert vision.PRESETS["fc100"]["inner_lr"] != 0.1
    cf = vision.VisionConfig(dataset="fc100", inner_lr=0.1).resolved()
    assert (cf.inner_lr, cf.meta_lr, cf.meta_batch) == (0.1, 3e-3, 32)
    assert vision.VisionConfig(dataset="fc100").resolved().inner_lr == vision.PRESETS["fc100"]["inner_lr"]
    maml, optimizer = vision.build(cf, torch.device("cpu"))  # and the override reaches the model
    assert maml.inner_lrs[0] == 0.1 and optimizer.param_groups[0]["lr"] == 3e-3
    # the paper's networks: Omniglot Conv4 stride 2 on 28x28x1, miniImageNet Conv4 32 ch + pool on 84x84x3
    assert vision.build_model(om)(torch.zeros(2, 1, 28, 28)).shape == (2, 5)
    net = vision.build_model(mi)
    assert net[0].out_channels == 32 and net(torch.zeros(1, 3, 84, 84)).shape == (1, 5)
    rn = vision.build_model(dataclasses.replace(cf, model="resnet12"))
    assert isinstance(rn, ResNet12) and rn(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="needs torchvision (PNG decoding)")
def test_omniglot_job_on_png_fixture(tmp_path, monkeypatch, one_thread):
    """The Omniglot path end to end (PNG folders -> rotation classes -> Conv4 stride 2 -> eval) with the
    published character lists swapped for a few characters each, so the fixture stays small."""
    from metafast.data import omniglot
    from test_vision_data import write_omniglot

    lists = {s: omniglot.split_characters(s)[:3] for s in ("train", "val", "test")}
    write_omniglot(str(tmp_path), sum(lists.values(), []), size=28, drawings=20)
    monkeypatch.setattr(omniglot, "split_characters", lambda split: lists[split])
    out = tmp_path / "run"
    rc = cli.main(["train", "--dataset", "omniglot", "--root", str(tmp_path), "--out", str(out), "--iterations", "3",
                      "--val-every", "3", "--val-episodes", "3", "--eval-episodes", "5", "--eval-queries", "5"] + TINY)
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "omniglot" and m["episodes"] == 5 and m["inner_steps"] == 3  # tested with 3 steps
    assert m["config"]["inner_lr"] == 0.4 and 0.0 <= m["accuracy"] <= 1.0
    # 3 characters x 4 rotations = 12 classes per split, decoded once and cached
    assert (tmp_path / "omniglot-py" / "cache-test-28.pt").is_file()


def test_options_fit_the_metafast_train_parser():
    """add_train_arguments extends the `metafast train` parser without clashing."""
    from metafast import cli

    args = cli.build_parser().parse_args(["train", "--dataset", "omniglot", "--ways", "20", "--shots", "5", "--root", "d",
                                          "--iterations", "7", "--model", "resnet12"])
    assert (args.ways, args.shots, args.root, args.iterations, args.model) == (20, 5, "d", 7, "resnet12")
    assert args.meta_batch is None and args.queries is None  # unset: the preset decides


def test_ctrl_c_saves_and_resumes_exactly(cifar_root, tmp_path, one_thread):
    cfg = vision.VisionConfig(dataset="cifarfs", root=cifar_root, meta_batch=3, width=4, queries=1, eval_queries=1,
                              iterations=4, val_every=2, val_episodes=3, eval_episodes=3, checkpoint_every=0,
                              device="cpu")
    quiet = dict(progress=False, log=lambda s: None, plot=False)
    vision.train_vision(cfg, str(tmp_path / "straight"), **quiet)

    def ctrl_c(iteration):
        if iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(vision.TrainingInterrupted) as e:
        vision.train_vision(cfg, str(tmp_path / "cut"), callback=ctrl_c, **quiet)
    assert e.value.iteration == 3 and e.value.checkpoint and not (tmp_path / "cut" / "metrics.json").exists()
    vision.train_vision(cfg, str(tmp_path / "cut"), resume=True, **quiet)
    a, b = load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "cut"))
    for k in a["maml"]:
        assert torch.equal(a["maml"][k], b["maml"][k]), k
    assert a["history"] == b["history"] and a["best"] == b["best"]
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert ma["per_episode_accuracy"] == mb["per_episode_accuracy"]


@pytest.mark.parametrize("memory,line", [("low", "memory: low (step-checkpointed exact reverse, chunks of 3 task(s))"),
                                         ("min", "memory: min (step-checkpointed exact reverse replaying each chunk's "
                                                 "inner loop, chunks of 3 task(s))")])
def test_memory_options_reach_batched_maml_and_are_checked(memory, line):
    args = cli.build_parser().parse_args(["train", "--dataset", "omniglot", "--memory", memory, "--task-chunk", "3"])
    assert (args.memory, args.task_chunk) == (memory, 3)
    cf = vision.VisionConfig(dataset="omniglot", memory=memory, task_chunk=3).resolved()
    maml, _ = vision.build(cf, torch.device("cpu"))
    assert (maml.memory, maml.task_chunk) == (memory, 3)
    assert line in maml.describe()
    for bad, name in ((dict(memory="tiny"), "memory"), (dict(task_chunk=0), "task_chunk")):
        with pytest.raises(ValueError, match=name):
            vision.VisionConfig(dataset="omniglot", **bad).resolved()
