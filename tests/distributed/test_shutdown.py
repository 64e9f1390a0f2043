"""shutdown_distributed() frees every process group before interpreter shutdown. A group left
alive is freed during finalisation, where a gloo worker thread dropping a tensor aborts the
process (SIGABRT after a run that succeeded, seen in CI on ~5% of 2-rank test processes)."""
from mp import run_world


def _shutdown_frees_the_world_group(rank, world):
    import os
    import weakref

    import torch.distributed as dist

    from longctx.parallel.groups import _self_group, shutdown_distributed
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401 - after init_process_group, as a trainer started by a test does
    single = weakref.ref(_self_group())
    world_pg = weakref.ref(dist.group.WORLD)
    out = [None] * world
    dist.all_gather_object(out, rank)  # a finished collective whose tensors the workers held
    dist.destroy_process_group()
    kept = world_pg() is not None  # what destroy_process_group alone leaves (DeepSpeed's defaults)
    shutdown_distributed()
    shutdown_distributed()  # idempotent
    return out, kept, world_pg() is None, single() is None


def test_shutdown_frees_every_group_even_after_deepspeed_was_imported():
    for out, kept, world_freed, single_freed in run_world(2, _shutdown_frees_the_world_group):
        assert out == [0, 1]
        assert kept, "DeepSpeed no longer holds the world group: shutdown_distributed's scrub may go"
        assert world_freed and single_freed
