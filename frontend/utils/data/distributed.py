"""cutegrad.utils.data.distributed: torch.utils.data.distributed's DistributedSampler (docs/distributed.md)."""
from ...data.distributed_sampler import DistributedSampler

__all__ = ["DistributedSampler"]
