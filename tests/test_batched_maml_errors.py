"""Bad input to BatchedMAML gives a clear error naming the argument."""
import pytest
import torch

from metafast import BatchedMAML
from metafast.models import MLP, Conv4


def reg(T=3, S=4, Q=4):
    return torch.randn(T, S, 1), torch.randn(T, S, 1), torch.randn(T, Q, 1), torch.randn(T, Q, 1)


def cls(T=2, S=5, Q=5, ways=5):
    return (torch.randn(T, S, 1, 28, 28), torch.randint(0, ways, (T, S)),
            torch.randn(T, Q, 1, 28, 28), torch.randint(0, ways, (T, Q)))


def test_mismatched_task_dims():
    sx, sy, qx, qy = reg()
    maml = BatchedMAML(MLP(1, [8], 1))
    with pytest.raises(ValueError, match="query_x.*3 tasks"):
        maml(sx, sy, qx[:2], qy)
    with pytest.raises(ValueError, match="support_y.*3 tasks"):
        maml(sx, sy[:2], qx, qy)
    with pytest.raises(ValueError, match="support_y.*4 targets"):
        maml(sx, sy[:, :3], qx, qy)


def test_empty_support_set():
    sx, sy, qx, qy = reg()
    with pytest.raises(ValueError, match="support_x.*empty"):
        BatchedMAML(MLP(1, [8], 1))(sx[:, :0], sy[:, :0], qx, qy)


def test_wrong_label_dtype_and_range():
    sx, sy, qx, qy = cls()
    maml = BatchedMAML(Conv4.omniglot(5), 0.4, 1, loss="cross_entropy")
    with pytest.raises(TypeError, match="support_y.*int64"):
        maml(sx, sy.float(), qx, qy)
    with pytest.raises(ValueError, match=r"query_y.*\[0, 5\)"):
        maml(sx, sy, qx, qy + 5)
    with pytest.raises(ValueError, match=r"support_y.*\[0, 5\)"):
        maml(sx, sy - 1, qx, qy)
    with pytest.raises(TypeError, match="support_y.*floating"):
        BatchedMAML(MLP(1, [8], 1))(torch.randn(2, 3, 1), torch.ones(2, 3, 1, dtype=torch.long),
                                     torch.randn(2, 3, 1), torch.randn(2, 3, 1))


def test_target_shape_is_not_broadcast():
    sx, sy, qx, qy = reg()
    with pytest.raises(ValueError, match=r"query_y.*\(3, 4, 1\)"):
        BatchedMAML(MLP(1, [8], 1))(sx, sy, qx, qy.squeeze(-1))


def test_nan_loss_is_reported():
    sx, sy, qx, qy = reg()
    sy[1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"support loss is NaN/inf for tasks \[1\]"):
        BatchedMAML(MLP(1, [8], 1))(sx, sy, qx, qy)
    with pytest.raises(FloatingPointError, match="query loss"):
        BatchedMAML(MLP(1, [8], 1), inner_lr=1e30)(*reg())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="inner_steps"):
        BatchedMAML(MLP(1, [8], 1), inner_steps=-1)
    with pytest.raises(ValueError, match="inner_lr"):
        BatchedMAML(MLP(1, [8], 1), inner_lr=[0.1, 0.2], inner_steps=3)
    with pytest.raises(ValueError, match="loss"):
        BatchedMAML(MLP(1, [8], 1), loss="hinge")
    with pytest.raises(ValueError, match="clip_grad_norm"):
        BatchedMAML(MLP(1, [8], 1), clip_grad_norm=0)
    with pytest.raises(TypeError, match="model"):
        BatchedMAML("mlp")
    frozen = MLP(1, [8], 1)
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        BatchedMAML(frozen)


def test_dtype_and_device_mismatch():
    sx, sy, qx, qy = reg()
    with pytest.raises(TypeError, match="support_x.*float64"):
        BatchedMAML(MLP(1, [8], 1))(sx.double(), sy, qx, qy)
