"""Setup under DDP, on two CPU processes (gloo): one rank's error ends every rank; rank 0 computes, the others read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.multiprocessing as mp

from instaflow_pl.errors import UserError
from instaflow_pl.ranks import rank_zero_first, setup_on_every_rank


class Part:
    """Stands in for a datamodule whose setup fails on one rank only (e.g. its dataset folder is missing there)."""

    def __init__(self, failing_rank: int):
        self.failing_rank = failing_rank

    @setup_on_every_rank
    def setup(self, stage: str) -> str:
        import torch.distributed as dist

        if dist.get_rank() == self.failing_rank:
            raise UserError(f"/data/pairs-{dist.get_rank()}/manifest.json not found")
        return "ready"


class OpensOnRankZero:
    """Stands in for a sharded predict module: rank 0 opens the output folder in setup and refuses it."""

    @setup_on_every_rank
    def setup(self, stage: str) -> None:
        def refuse():
            raise UserError("/data/eval holds an evaluation with other settings")

        rank_zero_first(refuse, lambda token: None, "OpensOnRankZero.setup")


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    record: dict = {}
    try:
        record["ok"] = Part(failing_rank=-1).setup("fit")
        try:
            Part(failing_rank=1).setup("fit")
        except UserError as err:
            record["error"] = str(err)
            record["printed_by_rank_zero"] = getattr(err, "printed_by_rank_zero", False)

        def compute():
            (Path(out) / f"computed-by-rank-{rank}").write_text("")
            (Path(out) / "cache.json").write_text(json.dumps({"mean": 1.5}))
            return {"mean": 1.5}, str(Path(out) / "cache.json")

        record["reference"] = rank_zero_first(compute, lambda path: json.loads(Path(path).read_text()), "cache")
        try:
            OpensOnRankZero().setup("predict")
        except UserError as err:
            record["nested"] = str(err)
    finally:
        (Path(out) / f"rank-{rank}.json").write_text(json.dumps(record))
        dist.destroy_process_group()


def test_one_ranks_setup_error_ends_every_rank_and_rank_zero_computes_once(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    records = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    for rank, record in enumerate(records):
        assert record["ok"] == "ready", "a setup that fails nowhere returns on every rank"
        assert record["error"] == "rank 1 of 2: /data/pairs-1/manifest.json not found", record
        assert record["printed_by_rank_zero"] == (rank != 0), "rank 0 prints the line, once"
        assert record["reference"] == {"mean": 1.5}
        assert record["nested"] == "rank 0 of 2: /data/eval holds an evaluation with other settings", "named once"
    assert sorted(p.name for p in tmp_path.glob("computed-by-*")) == ["computed-by-rank-0"]
