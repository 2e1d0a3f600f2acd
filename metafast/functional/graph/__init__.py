"""Module graphs (torch.fx traced) on batched layers: the engine for models that are not a plain chain."""
