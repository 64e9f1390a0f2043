"""shutdown_distributed() frees every process group before interpreter shutdown. A group left
alive is freed during finalisation, where a gloo worker thread dropping a tensor aborts the
process (SIGABRT after a run that succeeded, seen in CI on ~5% of 2-rank test processes)."""
from mp import run_world


def _shutdown_frees_every_group(rank, world):
    import os
    import weakref

    import torch
    import torch.distributed as dist

    from longctx.parallel.groups import _self_group, build_mesh, shutdown_distributed
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed reads them
    import deepspeed  # after init_process_group, as a trainer started by a test does
    mesh = build_mesh(world)  # sp over every rank: sp, dp and gradient groups, as training makes
    model = torch.nn.Linear(4, 4)
    engine, _, _, _ = deepspeed.initialize(  # keeps the mesh as its mpu, at module level
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), mpu=mesh, dist_init_required=False,
        config={"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 0}})
    groups = [dist.group.WORLD, _self_group(), mesh.sp_group, mesh.dp_group, mesh.grad_group]
    refs = [weakref.ref(g) for g in groups if g is not None]
    del engine, model, mesh, groups
    out = [None] * world
    dist.all_gather_object(out, rank)  # a finished collective whose tensors the workers held
    dist.destroy_process_group()
    kept = sum(r() is not None for r in refs)  # what destroy_process_group alone leaves alive
    shutdown_distributed()
    shutdown_distributed()  # idempotent
    return out, kept, [r() is None for r in refs]


def test_shutdown_frees_every_group_even_after_deepspeed_was_imported():
    for out, kept, freed in run_world(2, _shutdown_frees_every_group):
        assert out == [0, 1]
        assert kept, "nothing outlives destroy_process_group any more: shutdown_distributed's releases may go"
        assert all(freed), freed
