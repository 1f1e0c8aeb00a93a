"""rpp.teacher: class embeddings computed once per job (rank 0, then broadcast) and cached per teacher."""

import multiprocessing as mp
import os
import socket

import pytest
import torch
import torch.distributed as dist

from rpp.models import register_tiny_models
from rpp.teacher import Teacher

CLASSNAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cache_dir: str, out: "mp.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        register_tiny_models()
        torch.manual_seed(0)  # the same random teacher on every rank, as rpp.train seeds it
        teacher = Teacher("rpp-tiny-teacher", None, CLASSNAMES, "cpu", templates="single", cache_dir=cache_dir,
                          allow_random=True)  # fmt: skip
        out.put((rank, teacher.class_embeds_info["source"], teacher.class_embeds.numpy().copy()))  # by value
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
def test_class_embeddings_computed_on_rank0_broadcast_and_cached(tmp_path):
    ctx = mp.get_context("fork")
    port, world, out = _free_port(), 2, ctx.Queue()

    def job():
        procs = [ctx.Process(target=_rank, args=(r, world, port, str(tmp_path), out)) for r in range(world)]
        for p in procs:
            p.start()
        results = sorted(out.get(timeout=300) for _ in procs)
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
        return results

    (_, src0, emb0), (_, src1, emb1) = job()
    assert (src0, src1) == ("computed", "broadcast") and (emb0 == emb1).all() and emb0.shape[0] == len(CLASSNAMES)
    assert len(list(tmp_path.glob("teacher-class-embeds-rpp-tiny-teacher-*.pt"))) == 1  # written once, by rank 0
    port = _free_port()
    (_, src0, again), (_, src1, _) = job()  # the next job: rank 0 reads the cache, rank 1 still receives it
    assert (src0, src1) == ("cache", "broadcast") and (again == emb0).all()
