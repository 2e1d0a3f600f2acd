"""Distiller (training, evaluation, checkpoints and exact resume), the default distillation job and
the ``distill`` command module, with tiny settings."""
import argparse
import json
import os
import signal

import pytest
import torch
from torch import nn

from metafast.distill import Distiller, DistillInterrupted, KDLoss, accuracy, kd_loss
from metafast.jobs.distill import DistillConfig, make_dataset, mlp, run_distill_job

TINY = dict(train_size=200, transfer_size=600, test_size=400, teacher_hidden=32, student_hidden=8,
            teacher_steps=150, student_steps=120, batch_size=64, checkpoint_every=50)


def _data(seed=0):
    cfg = DistillConfig(seed=seed, **TINY)
    return cfg, make_dataset(cfg)


def _trained_teacher(cfg, x, y):
    torch.manual_seed(1)
    teacher = mlp(cfg.features, cfg.teacher_hidden, cfg.classes, depth=2)
    opt = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(teacher(x), y).backward()
        opt.step()
    return teacher.eval()


def _student(cfg, seed=2):
    torch.manual_seed(seed)
    return mlp(cfg.features, cfg.student_hidden, cfg.classes, depth=1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny MLPs: a second thread only adds wake-up stalls on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(_one_thread):
    cfg, (x, y, xt, x_test, y_test) = _data()
    return cfg, x, y, xt, x_test, y_test, _trained_teacher(cfg, x, y)


def test_distilled_student_beats_untrained_and_teacher_is_frozen(setup):
    cfg, x, y, xt, x_test, y_test, teacher = setup
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher.zero_grad(set_to_none=True)
    student = _student(cfg)
    untrained = accuracy(student, x_test, y_test)
    d = Distiller(teacher, student, temperature=3.0, alpha=0.8, lr=1e-2)
    out = d.fit(torch.cat([x, xt]), None, steps=150, batch_size=64, progress=False)
    assert out["steps"] == 150 and out["loss"] == out["loss"]
    ev = d.evaluate(x_test, y_test)
    chance = 1.0 / cfg.classes
    assert ev["teacher_accuracy"] > 0.6, ev
    assert ev["student_accuracy"] > max(untrained, chance) + 0.2, (untrained, ev)
    assert ev["agreement"] > 0.5, ev
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_step_uses_kd_loss_with_labels(setup):
    cfg, x, y, *_ , teacher = setup
    student = _student(cfg)
    d = Distiller(teacher, student, temperature=2.0, alpha=0.5)
    with torch.no_grad():
        want = KDLoss(2.0, 0.5)(student(x[:32]), teacher(x[:32]), y[:32])
    assert torch.allclose(d.loss(x[:32], y[:32]), want, atol=1e-6, rtol=1e-6)
    assert torch.allclose(want, kd_loss(student(x[:32]), teacher(x[:32]), y[:32], 2.0, 0.5), atol=1e-6)


def _fit(teacher, cfg, x, y, out_dir, steps, resume=False, interrupt_at=None, monkeypatch=None):
    d = Distiller(teacher, _student(cfg), temperature=4.0, alpha=0.9, lr=5e-3, seed=7)
    if interrupt_at is not None:  # a real Ctrl-C (SIGINT) after `interrupt_at` steps
        step = d.step

        def stepping(*a):
            r = step(*a)
            if d.step_count == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            return r
        monkeypatch.setattr(d, "step", stepping)
    d.fit(x, y, steps=steps, batch_size=32, out_dir=out_dir, checkpoint_every=7, resume=resume, progress=False)
    return d


def test_resume_is_exact_after_ctrl_c(setup, tmp_path, monkeypatch):
    cfg, x, y, _, _, _, teacher = setup
    full = _fit(teacher, cfg, x, y, str(tmp_path / "a"), steps=30)
    with pytest.raises(DistillInterrupted) as e:
        _fit(teacher, cfg, x, y, str(tmp_path / "b"), steps=30, interrupt_at=12, monkeypatch=monkeypatch)
    assert e.value.step == 12 and e.value.checkpoint and os.path.exists(e.value.checkpoint)
    resumed = _fit(teacher, cfg, x, y, str(tmp_path / "b"), steps=30, resume=True)
    assert resumed.step_count == 30
    for (k, a), b in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(a, b), f"{k} differs after resume"
    assert full.running.value() == resumed.running.value()
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        _fit(teacher, cfg, x, y, str(tmp_path / "b"), steps=40)


def test_distiller_bad_arguments(setup):
    cfg, x, y, *_, teacher = setup
    with pytest.raises(TypeError, match="teacher: expected an nn.Module"):
        Distiller("teacher", _student(cfg))
    with pytest.raises(ValueError, match="temperature must be a finite float > 0"):
        Distiller(teacher, _student(cfg), temperature=0)
    with pytest.raises(ValueError, match=r"alpha must be a float in \[0, 1\]"):
        Distiller(teacher, _student(cfg), alpha=2)
    d = Distiller(teacher, _student(cfg))
    with pytest.raises(ValueError, match=r"y: expected labels of shape \(200,\)"):
        d.fit(x, y[:10], steps=1, progress=False)
    with pytest.raises(ValueError, match="steps: expected an int >= 0"):
        d.fit(x, y, steps=-1, progress=False)


def test_job_reports_all_three_and_resume_skips_finished_phases(tmp_path):
    cfg = DistillConfig(**TINY)
    m = run_distill_job(cfg, str(tmp_path / "run"), progress=False)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for k in ("teacher_accuracy", "scratch_student_accuracy", "distilled_student_accuracy"):
        assert 1.0 / cfg.classes < m[k] <= 1.0 and saved[k] == m[k]
    assert m["teacher_parameters"] > m["student_parameters"]
    # Finished phases are loaded, not retrained: the metrics come out identical.
    again = run_distill_job(cfg, str(tmp_path / "run"), resume=True, progress=False)
    for k in ("teacher_accuracy", "scratch_student_accuracy", "distilled_student_accuracy"):
        assert again[k] == m[k]
    with pytest.raises(ValueError, match="a resumed run must keep its settings"):
        run_distill_job(DistillConfig(**{**TINY, "alpha": 0.5}), str(tmp_path / "run"), resume=True, progress=False)


def test_command_module(tmp_path, capsys):
    from metafast.commands import distill as command

    parser = argparse.ArgumentParser(prog="metafast")
    command.add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "cmd"
    argv = ["distill", "--out", str(out), "--no-progress", "--train-size", "150", "--transfer-size", "300",
            "--test-size", "200", "--teacher-steps", "40", "--student-steps", "30", "--batch-size", "32"]
    args = parser.parse_args(argv)
    assert command.main(args) == 0
    text = capsys.readouterr().out
    assert "distilled student" in text and "student from scratch" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["teacher_steps"] == 40 and metrics["transfer_examples"] == 300
    # The existing run is refused, and --resume with a changed setting is an error naming it.
    assert command.main(parser.parse_args(argv)) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert command.main(parser.parse_args(["distill", "--resume", str(out), "--alpha", "0.5"])) == 2
    assert "cannot change alpha" in capsys.readouterr().err
    assert command.main(parser.parse_args(["distill", "--out", str(tmp_path / "x"), "--alpha", "1.5"])) == 2
    assert "alpha must be in [0, 1]" in capsys.readouterr().err
