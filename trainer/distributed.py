"""Data-parallel plumbing of the PPO trainer: process group, collectives, DDP / FSDP2 wrapping, and
full (unsharded) state dicts for checkpoints and published weights."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as torch_dist
from torch import nn

if TYPE_CHECKING:
    from trainer.ppo import PPOArgs

log = logging.getLogger(__name__)


# =====================================================================================================
# Distributed setup (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
# =====================================================================================================


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def setup_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    initialized_here = False
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        initialized_here = True
    return Dist(rank, world, torch.device(device), initialized_here)


def broadcast_object(obj: Any, dist: Dist) -> Any:
    """Rank 0's `obj` on every rank (pickled; small payloads: trajectory bytes, counters)."""
    if not dist.on:
        return obj
    box = [obj if dist.main else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values: torch.Tensor, dist: Dist) -> torch.Tensor:
    """Elementwise sum over ranks (on the rank's device: nccl reduces CUDA tensors only)."""
    if not dist.on:
        return values
    reduced = values.to(dist.device, copy=True)
    torch_dist.all_reduce(reduced)
    return reduced.to(values.device)


def sum_over_ranks(values: dict[str, Any], dist: Dist) -> dict[str, float]:
    """Named scalars (floats or 0-d tensors) summed over all ranks, as floats."""
    local = torch.tensor([float(v) for v in values.values()], dtype=torch.float64)
    return dict(zip(values, all_reduce_sum(local, dist).tolist(), strict=True))


def barrier(dist: Dist) -> None:
    if dist.on:
        torch_dist.barrier()


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP) as the plain tensor it stands for; a plain tensor as it is."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP's wrapper (FSDP2 shards the module in place: nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sharded(dist: Dist, args: PPOArgs) -> bool:
    return dist.on and args.parallel == "fsdp"


def shard_model(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer (the classes HF lists in `_no_split_modules`), then the
    root (embeddings, final norm, heads: tied weights stay together in the root's group)."""
    from torch.distributed.fsdp import fully_shard

    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if m is not model and type(m).__name__ in layer_types]
    if not layers:
        log.warning("%s lists no decoder layers (_no_split_modules): sharding it as one unit",
                    type(model).__name__)  # fmt: skip
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model: nn.Module, dist: Dist, args: PPOArgs) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights, keyed as `unwrap(model).state_dict()`. Under FSDP a collective
    (every rank must call it) that returns them, on the CPU, on rank 0 only ({} elsewhere); tied
    parameters come back as one tensor under each of their names, as from `state_dict()`."""
    if not sharded(dist, args):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if state:
        aliases: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(param), []).append(name)
        for names in aliases.values():  # gathered separately: tie them again (save_pretrained dedupes)
            for name in names[1:]:
                if names[0] in state and name in state:
                    state[name] = state[names[0]]
    return state


def full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, dist: Dist, args: PPOArgs
) -> dict[str, Any]:
    """`optimizer.state_dict()` in its usual form (parameters numbered in `model.parameters()` order).
    Under FSDP a collective: the gathered full state, on the CPU, on rank 0 only ({} elsewhere)."""
    if not sharded(dist, args):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not dist.main:
        return {}
    number = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return {
        "state": {number[name]: value for name, value in full["state"].items()},
        "param_groups": [
            {**group, "params": [number[name] for name in group["params"]]} for group in full["param_groups"]
        ],
    }


def load_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any], dist: Dist, args: PPOArgs
) -> None:
    """Load a `full_optimizer_state` (every rank passes the whole of it; FSDP keeps this rank's shard)."""
    if not sharded(dist, args):
        optimizer.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in model.named_parameters()]
    by_name = {
        "state": {names[i]: value for i, value in saved["state"].items()},
        "param_groups": [
            {**group, "params": [names[i] for i in group["params"]]} for group in saved["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, optim_state_dict=by_name, options=StateDictOptions(full_state_dict=True)
    )


def parallelize(
    policy: nn.Module, critic: nn.Module, reference: nn.Module, dist: Dist, args: PPOArgs
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(policy, critic, reference) for this world: as they are in one process; policy and critic under
    DDP (the reference, never trained, stays whole); or all three sharded with FSDP2. The reference is
    sharded too because it is as large as the policy: keeping it whole would undo most of the saving."""
    if not dist.on:
        return policy, critic, reference
    if args.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        # Every rank loaded the same weights (same files, same seed): fully_shard keeps its own slice.
        mesh = init_device_mesh(dist.device.type, (dist.world,))
        return shard_model(policy, mesh), shard_model(critic, mesh), shard_model(reference, mesh)
    # DDP broadcasts rank 0's parameters at construction; gradients are averaged in backward.
    ddp_ids = [dist.device.index] if dist.device.type == "cuda" else None
    return (
        nn.parallel.DistributedDataParallel(policy, device_ids=ddp_ids),
        nn.parallel.DistributedDataParallel(critic, device_ids=ddp_ids),
        reference,
    )


def check_replicas_in_sync(models: Sequence[nn.Module], dist: Dist, args: PPOArgs | None = None) -> None:
    """Every rank holds the same weights (DDP keeps them so; a cheap checksum proves it). Under FSDP
    there are no replicas (each rank holds its own shard): nothing to check."""
    if not dist.on or (args is not None and sharded(dist, args)):
        return
    total = sum(float(p.detach().double().sum()) for m in models for p in unwrap(m).parameters())
    mine = torch.tensor([total, -total], dtype=torch.float64, device=dist.device)
    torch_dist.all_reduce(mine, op=torch_dist.ReduceOp.MAX)
    if mine[0] != -mine[1]:
        raise RuntimeError(f"DDP replicas diverged: parameter checksums range over [{-mine[1]}, {mine[0]}]")
