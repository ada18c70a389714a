"""Data-parallel `cutegrad train`: what a worker started by `cutegrad train --nproc-per-node N` does differently.

`cutegrad train <workload> --nproc-per-node N` re-runs the same command under
`cutegrad launch` (launch.relaunch_train).  Each worker finds WORLD_SIZE > 1 in
its environment and `DataParallelRun.from_env` returns its plan:
- the process group: "nccl" on CUDA (one GPU per worker, cuda:LOCAL_RANK),
  "cpu" otherwise;
- the model wrapped in DistributedDataParallel (rank 0's initial weights);
- the data: every worker draws the same global batch from the same seed and
  keeps its contiguous share of rows (`shard`), so the global batch (the
  preset's batch size, which must divide by N) and the data order are those of
  a one-process run;
- only rank 0 prints, shows progress, evaluates and writes the checkpoint,
  metrics and plot; the group is destroyed (a final barrier) before that.
"""
import os


class DataParallelRun:
    def __init__(self, rank, world, local_rank, device):
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.device = device
        self.is_main = rank == 0

    @classmethod
    def from_env(cls, device):
        """The plan of a worker started by the launcher, or None for a plain one-process run."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in os.environ:
            return None
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            device = f"cuda:{local}"
        return cls(rank, world, local, device)

    def start(self, batch_size):
        from . import init_process_group
        if batch_size % self.world:
            raise ValueError(f"the global batch {batch_size} does not divide among {self.world} processes; pick a "
                             f"--batch-size that is a multiple of --nproc-per-node")
        init_process_group("nccl" if self.device.startswith("cuda") else "cpu")

    def wrap(self, model):
        from ..nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model)

    def shard(self, batch):
        """This rank's contiguous share of the rows of a global batch (inputs, targets)."""
        inputs, targets = batch
        share = len(inputs) // self.world
        lo = self.rank * share
        return inputs[lo:lo + share], targets[lo:lo + share]

    def average(self, loss):
        """The step's loss averaged over the ranks (the loss of the global batch)."""
        from . import ReduceOp, all_reduce
        from .process_group import skip_cross_rank_checks
        loss = loss.detach().clone()
        with skip_cross_rank_checks():  # every rank's loss is a scalar of the same dtype
            all_reduce(loss, op=ReduceOp.AVG)
        return loss

    def metrics(self, batch_size):
        return {"processes": self.world, "global_batch": batch_size, "per_process_batch": batch_size // self.world,
                "loss": "averaged over processes"}

    def finish(self):
        from . import destroy_process_group
        destroy_process_group()

    def describe(self, batch_size):
        return f"data parallel over {self.world} processes: global batch {batch_size}, " \
               f"{batch_size // self.world} per process"
