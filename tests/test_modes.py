"""metafast.functional.modes.eval_mode: eval inside the block, the previous mode back after it, also when it raises."""
import pytest
import torch
from torch import nn

from metafast.functional.modes import eval_mode


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("was_training", [True, False])
def test_eval_mode_restores_the_previous_mode(was_training):
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4)).train(was_training)
    with eval_mode(model) as m:
        assert m is model
        assert not any(sub.training for sub in model.modules())
        model(torch.randn(2, 3))  # eval-mode BatchNorm: running statistics, not updated
    assert all(sub.training == was_training for sub in model.modules())
    assert model[2].num_batches_tracked.item() == 0


@pytest.mark.parametrize("was_training", [True, False])
def test_eval_mode_restores_the_mode_when_the_block_raises(was_training):
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5)).train(was_training)
    with pytest.raises(Boom):
        with eval_mode(model):
            assert not model.training and not model[1].training
            raise Boom("inside the block")
    assert all(sub.training == was_training for sub in model.modules())


def test_eval_mode_goes_through_train_overrides():
    calls = []

    class Tracked(nn.Linear):
        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    model = Tracked(2, 2)
    with eval_mode(model):
        pass
    assert calls == [False, True]


def test_eval_mode_rejects_a_non_module():
    with pytest.raises(TypeError, match="module: expected an nn.Module, got list"):
        with eval_mode([]):
            pass
