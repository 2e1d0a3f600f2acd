"""Naive per-task autograd MAML: the oracle every batched path is tested against (float64)."""
import torch
import torch.nn.functional as F
from torch.func import functional_call


def per_task_maml(model, support_x, support_y, query_x, query_y, lr, steps, first_order=False, loss="mse",
                  lrs=None, head_names=None, max_norm=None, return_params=False, step_lrs=None, step_weights=None,
                  step_params=None):
    """Mean query loss after `steps` SGD steps per task, one task at a time (create_graph autograd).

    lr: a float or one float per step. lrs: optional dict name -> per-parameter lr tensor (Meta-SGD).
    head_names: adapt only these (ANIL). max_norm: clip each task's inner gradient to this L2 norm.
    return_params: also return each task's adapted parameter dict.
    step_lrs: MAML++ LSLR, one dict name -> scalar rate tensor per step (overrides lr).
    step_weights: MAML++ multi-step loss, one weight per step: the query loss after each step, weighted.
    step_params: MAML++ per-step BatchNorm weights, one dict name -> tensor per step: they replace those
    parameters in step k's support pass and in the query pass after step k.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    adapted = list(params) if head_names is None else list(head_names)

    def loss_fn(out, y):
        if loss == "mse":
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)

    total = 0.0
    adapted_params = []
    T = support_x.shape[0]
    for t in range(T):
        p = dict(params)
        for step in range(steps):
            if step_params is not None:
                p.update(step_params[step])
            out = functional_call(model, {**p, **buffers}, (support_x[t],))
            grads = torch.autograd.grad(loss_fn(out, support_y[t]), [p[n] for n in adapted],
                                        create_graph=not first_order)
            if max_norm is not None:
                norm = torch.sqrt(sum((g * g).sum() for g in grads))
                grads = [g * torch.clamp(max_norm / (norm + 1e-6), max=1.0) for g in grads]
            for n, g in zip(adapted, grads):
                if first_order:
                    g = g.detach()
                step_lr = lrs[n] if lrs is not None else (lr[step] if isinstance(lr, (list, tuple)) else lr)
                if step_lrs is not None:
                    step_lr = step_lrs[step][n]
                p[n] = p[n] - step_lr * g
            if step_params is not None:
                p.update(step_params[step])
            if step_weights is not None and step < steps - 1:
                out = functional_call(model, {**p, **buffers}, (query_x[t],))
                total = total + step_weights[step] * loss_fn(out, query_y[t])
        adapted_params.append(p)
        out = functional_call(model, {**p, **buffers}, (query_x[t],))
        last = 1.0 if step_weights is None or steps == 0 else step_weights[-1]
        total = total + last * loss_fn(out, query_y[t])
    if return_params:
        return total / T, adapted_params
    return total / T
