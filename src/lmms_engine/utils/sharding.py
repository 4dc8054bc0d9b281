"""Whether a module's forward is a collective (its weights are gathered from other ranks inside it)."""

from __future__ import annotations

from torch import nn


def gathers_weights(module: nn.Module) -> bool:
    """Whether ``module`` (or a submodule) is sharded by FSDP2 (``fully_shard``), FSDP1 or DeepSpeed
    ZeRO-3: its forward all-gathers weights, frozen or not, so every rank must run it as often as the
    others do, whatever its own batch holds."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return (any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in module.modules())
            or any(hasattr(p, "ds_id") for p in module.parameters()))


__all__ = ["gathers_weights"]
