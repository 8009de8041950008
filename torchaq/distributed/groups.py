"""Process groups and shards of the vocabulary-parallel layer: which group, which rows, how many draws."""
from __future__ import annotations

import sys
from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


def resolve_group(weight, group, mesh_dim):
    """``(local weight tensor, process group)`` from a tensor or a DTensor and a group / DeviceMesh / None."""
    # DTensor / DeviceMesh are only looked for when their modules are loaded (a DTensor or a
    # mesh exists only then): importing torch.distributed.tensor costs about a second
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    mesh_mod = sys.modules.get("torch.distributed.device_mesh")
    if tensor_mod is not None and isinstance(weight, tensor_mod.DTensor):
        mesh = weight.device_mesh
        sharded = [i for i, p in enumerate(weight.placements) if isinstance(p, tensor_mod.Shard)]
        if len(sharded) != 1 or weight.placements[sharded[0]].dim != 0:
            raise ValueError(f"a DTensor weight_shard must be sharded on dim 0 over one mesh dimension, got placements {weight.placements}")
        if group is None:
            group = mesh.get_group(sharded[0])
        local = weight.to_local()
        weight = local if not isinstance(weight, nn.Parameter) else nn.Parameter(local.detach(), requires_grad=weight.requires_grad)
    if mesh_mod is not None and isinstance(group, mesh_mod.DeviceMesh):
        if mesh_dim is None and group.ndim != 1:
            raise ValueError(f"group is a {group.ndim}-D DeviceMesh: pass mesh_dim= to name the vocabulary dimension")
        group = group.get_group(mesh_dim)
    elif mesh_dim is not None:
        raise ValueError("mesh_dim is only meaningful when group is a DeviceMesh")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    if group is None:
        group = dist.group.WORLD
    elif not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be None, a ProcessGroup or a DeviceMesh, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of group")
    return weight, group


def describe(t) -> str:
    """``"dtype (shape)"`` of a tensor, else its type name (for error messages)."""
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def shard_sizes(total: int, weights: Sequence[float]) -> List[int]:
    """Split ``total`` (draws, rows) over strata in proportion to ``weights``, at least one each (largest remainders)."""
    n = len(weights)
    w = torch.tensor(weights, dtype=torch.float64).clamp_min(0)
    w = w / w.sum() if float(w.sum()) > 0 else torch.full((n,), 1.0 / n, dtype=torch.float64)
    share = 1 + w * (total - n)  # one each, the rest in proportion
    counts = share.floor().long()
    order = sorted(range(n), key=lambda i: (-(float(share[i]) - int(counts[i])), i))
    for i in order[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def gather_into(out: Tensor, x: Tensor, group, async_op: bool = False):
    """All-gather ``x`` of every rank into ``out`` (the ranks' tensors stacked on dim 0): torch's
    ``all_gather_single`` (``all_gather_into_tensor`` before it was renamed); the work handle when ``async_op``."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, x, group=group, async_op=async_op)


def all_gather_rows(x: Tensor, group, world_size: int) -> Tensor:
    """``(P,) + x.shape``: every rank's ``x`` (same shape on every rank), rank order."""
    if world_size == 1:
        return x.unsqueeze(0)
    x = x.contiguous()
    out = torch.empty((world_size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    gather_into(out, x, group)  # gloo wants the ranks stacked on dim 0
    return out.view((world_size,) + tuple(x.shape))
