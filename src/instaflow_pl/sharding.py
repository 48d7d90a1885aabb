"""Sharded training: FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``.

``--trainer.strategy=sharded`` (or ``class_path: instaflow_pl.sharding.ShardedStrategy``) shards the velocity
network's parameters, gradients, optimizer state and EMA over every rank (data parallel, no tensor parallelism).
The training module's ``configure_model`` calls :func:`shard_network`: each block its family names
(``Family.shard_blocks``) becomes one FSDP unit, then the network as a whole; frozen weights and LoRA adapters are
sharded with the blocks that hold them. Checkpoints are distributed folders (each rank writes its shards; nothing is
gathered), read back by :class:`ShardedStrategy` (resume) and :mod:`instaflow_pl.export` (one process, shard by
shard).

What does not compose is refused before any rank starts (:func:`check_sharded_run`): a velocity that is not a
family's network, a family without blocks to wrap, ``compile``, and callbacks that sample on rank zero alone (every
rank must take part in a sharded forward).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from instaflow_pl.errors import UserError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

STRATEGY_NAME = "sharded"
"""``--trainer.strategy`` value that selects :class:`ShardedStrategy`."""
METADATA_FILE = ".metadata"
"""The file that marks a distributed checkpoint folder (torch.distributed.checkpoint's index of the shards)."""
LIGHTNING_META_FILE = "meta.pt"
"""Lightning's file in a distributed checkpoint folder: everything but the weights and optimizer states."""
RANK_ZERO_SAMPLERS = ("SampleGrid", "Trajectories", "SampleQuality")
"""Callbacks that sample with the model on rank zero alone, which a sharded model cannot do."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a distributed checkpoint folder (what a sharded fit writes instead of a ``.ckpt`` file)."""
    path = Path(path).expanduser()
    return path.is_dir() and (path / METADATA_FILE).is_file()


def shard_network(
    network: nn.Module, block_classes: tuple[str, ...], mesh: DeviceMesh, mixed_precision: torch.dtype | None
) -> int:
    """``fully_shard`` each block of ``network`` whose class is named in ``block_classes``, then the network.

    Blocks nested in another wrapped block are wrapped first (FSDP2 units nest). Parameters outside every block
    (embeddings, the input and output layers) belong to the network's own unit.

    Args:
        network: The module that is called as a whole (the velocity's network).
        block_classes: Class names of the blocks (the family's ``shard_blocks``).
        mesh: The data-parallel device mesh.
        mixed_precision: Parameter dtype for compute (e.g. bf16): weights are kept, and gradients reduced, in
            float32; None computes in the parameters' own dtype.

    Returns:
        The number of blocks wrapped.

    Raises:
        UserError: no block of those classes in ``network``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    if mixed_precision is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    blocks = [m for m in network.modules() if type(m).__name__ in block_classes]
    if not blocks:
        raise UserError(
            f"sharded training found no block to wrap in the {type(network).__name__} (looked for "
            f"{', '.join(block_classes) or 'none declared by its family'}); use strategy ddp"
        )
    for block in reversed(blocks):  # modules() is pre-order: inner blocks come last, and are wrapped first
        fully_shard(block, **kwargs)
    fully_shard(network, **kwargs)
    return len(blocks)


def unsharded_class(module: nn.Module) -> type:
    """The class of ``module`` before ``fully_shard`` (which swaps in a subclass called ``FSDP<name>``)."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(module)
    if isinstance(module, FSDPModule):
        return next(base for base in cls.__mro__[1:] if not issubclass(base, FSDPModule))
    return cls


def compute_dtype(precision: str | None) -> torch.dtype | None:
    """The parameter dtype sharded compute uses under a Lightning ``precision``: bf16 for ``bf16-mixed`` (float32
    weights and gradient reduction), None otherwise (the weights' own dtype, e.g. ``bf16-true``'s)."""
    return torch.bfloat16 if str(precision) == "bf16-mixed" else None


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as fully sharded data parallelism over every rank (FSDP2).

    The data-parallel mesh spans all ranks of all nodes; the training module shards itself in ``configure_model``.
    Checkpoints are distributed folders; resuming one reads each rank's shards in place, and leaves the frozen
    parts the module restores from its ``base_model`` (text encoder, frozen base weights) as they are.

    Args:
        process_group_backend: ``nccl`` on GPUs and ``gloo`` on CPUs by default.
        timeout: Collective timeout.
    """

    def __init__(self, process_group_backend: str | None = None, timeout: timedelta | None = None) -> None:
        from torch.distributed.constants import default_pg_timeout

        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=True,
            process_group_backend=process_group_backend,
            timeout=timeout or default_pg_timeout,
        )

    def setup_environment(self) -> None:
        """Every rank is a data-parallel rank: the mesh is (world size, 1)."""
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The module's own state dict: DTensor shards of the network and its EMA, which each rank writes itself
        (the module then leaves out what its base model restores)."""
        return self.lightning_module.state_dict()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a distributed checkpoint folder into the sharded module and optimizers, each rank its own shards.

        Raises:
            UserError: ``checkpoint_path`` is a single-file (unsharded) checkpoint.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from instaflow_pl.checkpoints import read_checkpoint

        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            raise UserError(unsharded_resume_message(path))
        module = self.lightning_module
        left_out = getattr(module, "keys_left_out_of_checkpoints", lambda: set())()
        state = {k: v for k, v in module.state_dict().items() if k not in left_out}
        dcp.load({"state_dict": state}, checkpoint_id=path)
        module.load_state_dict(state, strict=False)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key])
        return read_checkpoint(path / LIGHTNING_META_FILE, trust_checkpoint=weights_only is False)


StrategyRegistry.register(STRATEGY_NAME, ShardedStrategy, description="FSDP2 over every rank (instaflow-pl)")


def unsharded_resume_message(path: Path) -> str:
    """The one line for a single-file checkpoint given to a sharded resume."""
    return (
        f"{path} is a single-file (unsharded) checkpoint, and this run is sharded (strategy {STRATEGY_NAME}); resume "
        "it with the strategy that wrote it (e.g. ddp), or export it and start the sharded run from the export"
    )


def sharded_resume_message(path: Path, strategy: str) -> str:
    """The one line for a distributed checkpoint folder given to an unsharded resume."""
    return (
        f"{path} is a sharded checkpoint (a folder of shards), and this run's strategy is {strategy}; resume it with "
        f"--trainer.strategy={STRATEGY_NAME}, or export it (instaflow-pl export reads it) and start from the export"
    )


def is_sharded_strategy(strategy: Any) -> bool:
    """Whether a trainer's strategy (or its ``--trainer.strategy`` value) shards the model."""
    if isinstance(strategy, str):
        return strategy == STRATEGY_NAME
    return isinstance(strategy, ModelParallelStrategy)


def check_sharded_run(trainer, model, ckpt_path: str | Path | None = None) -> None:
    """Refuse, in one line and before any rank starts, what does not compose with the trainer's strategy.

    Under a sharded strategy: a module that does not shard itself, a velocity that is not a family's network, a
    family without blocks to wrap, ``compile``, tensor parallelism, callbacks that sample on rank zero alone. For
    any strategy: a checkpoint of the other kind (a folder of shards to an unsharded run, or the reverse).

    Raises:
        UserError: the first problem found.
    """
    sharded = is_sharded_strategy(trainer.strategy)
    _check_checkpoint_kind(trainer, ckpt_path, sharded)
    if not sharded:
        return
    from instaflow_pl.velocity import NetworkVelocity

    if not hasattr(model, "keys_left_out_of_checkpoints"):  # the training modules (FlowModule)
        raise UserError(f"strategy {STRATEGY_NAME} trains ReflowModule and DistillModule, not {type(model).__name__}")
    if not isinstance(model.velocity, NetworkVelocity):
        raise UserError(
            f"strategy {STRATEGY_NAME} shards a family's network by its blocks, and this velocity "
            f"({type(model.velocity).__name__}) is not one; use strategy ddp"
        )
    family = model.velocity.family
    if not family.shard_blocks:
        raise UserError(f"the {family.title} family names no blocks to shard (Family.shard_blocks); use strategy ddp")
    names = {type(m).__name__ for m in model.velocity.network.modules()}
    if not names & set(family.shard_blocks):
        raise UserError(
            f"sharded training found no block to wrap in the {type(model.velocity.network).__name__} (looked for "
            f"{', '.join(family.shard_blocks)}); use strategy ddp"
        )
    if model.hparams.get("compile"):
        raise UserError(
            f"compile: true does not compose with strategy {STRATEGY_NAME} here (the whole network is compiled "
            "before it is sharded); drop compile or use strategy ddp"
        )
    tensor_parallel = getattr(trainer.strategy, "_tensor_parallel_size", 1)
    if tensor_parallel not in (1, "auto") or (tensor_parallel == "auto" and trainer.num_devices > 1):
        raise UserError(
            "the training modules shard over data-parallel ranks only (tensor_parallel_size 1); use "
            f"--trainer.strategy={STRATEGY_NAME}"
        )
    samplers = sorted({type(c).__name__ for c in trainer.callbacks} & set(RANK_ZERO_SAMPLERS))
    if samplers:
        raise UserError(
            f"{', '.join(samplers)} sample{'s' if len(samplers) == 1 else ''} on rank zero alone, which a sharded "
            f"model cannot (every rank holds a part of it); remove {'it' if len(samplers) == 1 else 'them'} from "
            f"trainer.callbacks under strategy {STRATEGY_NAME} (val/mse@N and val/straightness are still logged)"
        )


def _check_checkpoint_kind(trainer, ckpt_path: str | Path | None, sharded: bool) -> None:
    if not ckpt_path:
        return
    path = Path(str(ckpt_path)).expanduser()
    if str(ckpt_path) == "last":
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if not dirpath:
            return
        path = Path(dirpath) / "last.ckpt"
    if not path.exists():
        return
    if sharded and not is_sharded_checkpoint(path):
        raise UserError(unsharded_resume_message(path))
    if not sharded and is_sharded_checkpoint(path):
        raise UserError(sharded_resume_message(path, type(trainer.strategy).__name__))
