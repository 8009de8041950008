"""``QuantizedVocabParallel``: a torch tensor-parallel ``ParallelStyle`` that shards an ``nn.Linear`` head over the vocabulary and quantizes it.

    from torch.distributed.tensor.parallel import parallelize_module
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))   # or a 1-D mesh
    parallelize_module(model, mesh, {"lm_head": torchaq.distributed.QuantizedVocabParallel(queries=h_sample)})
    logits_shard = model(x)                       # (..., V_r): this rank's vocabulary slice
    values, ids = model.lm_head.topk(h, k=10)     # the single-device QuantizedSoftmax answer

As torch's ``ColwiseParallel`` on a head (torchtitan's ``"output"``), the weight's rows are split in
``torch.chunk`` slices over the mesh's tensor-parallel dimension (the mesh itself when 1-D; on a
2-D mesh ``mesh_dim``, default the dimension named ``"tp"``, else the last: TP inside, data
parallel across), taken from group rank 0's copy of the weight (``src_data_rank``, as
``distribute_tensor``). The ``nn.Linear`` object becomes (in place, as torch's styles change
their module in place) a :class:`VocabParallelHead`: a
:class:`~torchaq.distributed.VocabParallelQuantizedSoftmax` over that group (shared codebooks
fitted at ``_apply``, with ``queries`` calibrating them) whose ``forward`` follows DTensor
conventions: the input ``h`` replicated (a plain tensor or a ``Replicate()`` DTensor), the logits

* ``output="shard"`` (default): sharded on the last (vocabulary) dim -- a local ``(..., V_r)``
  tensor (``use_local_output=True``, as ``loss_parallel`` expects) or a ``Shard(-1)`` DTensor;
* ``output="gather"``: the full ``(..., V)`` logits on every rank (one all-gather of ``B max(V_r)``
  floats per rank after the header agreement; backward keeps each rank's slice of the gradient).
"""
from __future__ import annotations

import sys
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor.parallel import ParallelStyle

from torchaq.distributed.layer import VocabParallelQuantizedSoftmax

from torchaq.distributed.groups import gather_into


class _GatherLogits(torch.autograd.Function):
    """All-gather of the ranks' ``(..., V_r)`` logits into ``(..., V)``; backward: this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, head: "VocabParallelHead") -> Tensor:
        ctx.range = head.vocab_range
        width = max(head.shard_sizes)
        flat = x.reshape(-1, x.shape[-1])
        padded = flat.new_zeros((flat.shape[0], width))
        padded[:, : flat.shape[1]] = flat
        out = torch.empty((head.world_size * padded.shape[0], width), dtype=x.dtype, device=x.device)
        gather_into(out, padded.contiguous(), head.group)
        out = out.view(head.world_size, flat.shape[0], width)
        full = torch.cat([out[r, :, :n] for r, n in enumerate(head.shard_sizes)], 1)
        return full.reshape(x.shape[:-1] + (head.num_classes,))

    @staticmethod
    def backward(ctx, grad: Tensor):
        start, stop = ctx.range
        return grad[..., start:stop].contiguous(), None


class VocabParallelHead(VocabParallelQuantizedSoftmax):
    """The module :class:`QuantizedVocabParallel` puts in place of the ``nn.Linear`` (module docstring).

    Everything of :class:`VocabParallelQuantizedSoftmax` (``topk``, ``log_softmax_topk``,
    ``sample``, ``sampled_softmax_loss``, ``refresh``); ``forward`` returns logits in the layout
    asked for, ``mesh`` is the tensor-parallel sub-mesh (``None`` for an unnamed multi-dim mesh).
    """

    def __init__(self, *args, output: str = "shard", use_local_output: bool = True, mesh=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output, self.use_local_output, self.mesh = output, use_local_output, mesh

    def forward(self, h: Tensor) -> Tensor:
        tensor_mod = sys.modules.get("torch.distributed.tensor")
        if tensor_mod is not None and isinstance(h, tensor_mod.DTensor):
            if not all(isinstance(p, tensor_mod.Replicate) for p in h.placements):
                raise ValueError(f"the head's input must be replicated, got a DTensor with placements {h.placements}")
            h = h.to_local()
        if self.output == "gather":
            self.begin("gather_logits", h)
            return _GatherLogits.apply(super().forward(h), self)
        logits = super().forward(h)
        if self.use_local_output:
            return logits
        if self.mesh is None:
            raise ValueError("use_local_output=False needs a named tensor-parallel mesh dimension")
        shape = logits.shape[:-1] + (self.num_classes,)
        stride = tuple(torch.empty(shape, device="meta").stride())
        return tensor_mod.DTensor.from_local(logits, self.mesh, [tensor_mod.Shard(logits.dim() - 1)], run_check=False,
                                             shape=shape, stride=stride)


class QuantizedVocabParallel(ParallelStyle):
    """Shard an ``nn.Linear(d, V)`` head over the vocabulary and quantize it (module docstring).

    Args:
        queries: optional ``(B, d)`` hidden states calibrating the shared codebooks.
        output: ``"shard"`` (logits sharded on the vocabulary dim) or ``"gather"`` (full logits).
        use_local_output: with ``output="shard"``, a local tensor (default) or a ``Shard(-1)`` DTensor.
        mesh_dim: on a multi-dim mesh, the tensor-parallel dimension (name or index; default
            ``"tp"`` if named so, else the last).
        invariant: the layer's mode (default ``True``: the single-device answers at every world size).
        **kwargs: :class:`torchaq.QuantizedSoftmax` options (``num_subspaces``, ``bits``, ``candidates``, ...).
    """

    def __init__(self, queries: Optional[Tensor] = None, *, output: str = "shard", use_local_output: bool = True,
                 mesh_dim: Optional[Union[int, str]] = None, invariant: bool = True, **kwargs):
        super().__init__()
        if output not in ("shard", "gather"):
            raise ValueError(f'output must be "shard" or "gather", got {output!r}')
        self.queries, self.output, self.use_local_output = queries, output, use_local_output
        self.mesh_dim, self.invariant, self.kwargs = mesh_dim, invariant, kwargs

    def _tp_mesh(self, device_mesh):
        """``(group, 1-D sub-mesh or None)`` of the tensor-parallel dimension."""
        if device_mesh.ndim == 1:
            return device_mesh.get_group(0), device_mesh
        names = device_mesh.mesh_dim_names
        dim = self.mesh_dim
        if dim is None:
            dim = "tp" if names is not None and "tp" in names else device_mesh.ndim - 1
        if isinstance(dim, str):
            if names is None or dim not in names:
                raise ValueError(f"mesh_dim {dim!r} is not a dimension of the mesh (names {names})")
            return device_mesh.get_group(dim), device_mesh[dim]
        if not 0 <= int(dim) < device_mesh.ndim:
            raise ValueError(f"mesh_dim must be in [0, {device_mesh.ndim}), got {dim}")
        sub = device_mesh[names[int(dim)]] if names is not None else None
        return device_mesh.get_group(int(dim)), sub

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"QuantizedVocabParallel shards an nn.Linear head, got {type(module).__name__}")
        group, sub = self._tp_mesh(device_mesh)
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        weight = module.weight.detach().clone()
        bias = None if module.bias is None else module.bias.detach().clone()
        if self.src_data_rank is not None and world > 1:  # every rank starts from group rank 0's head
            root = dist.get_global_rank(group, 0)
            dist.broadcast(weight, src=root, group=group)
            if bias is not None:
                dist.broadcast(bias, src=root, group=group)
        chunks = weight.chunk(world)
        if len(chunks) != world:
            raise ValueError(f"V={weight.shape[0]} rows cannot give each of the {world} ranks a torch.chunk slice")
        start = sum(c.shape[0] for c in chunks[:rank])
        stop = start + chunks[rank].shape[0]
        w_shard = nn.Parameter(weight[start:stop].contiguous(), requires_grad=module.weight.requires_grad)
        b_shard = None if bias is None else nn.Parameter(bias[start:stop].contiguous(), requires_grad=module.bias.requires_grad)
        head = VocabParallelHead(w_shard, b_shard, group=group, queries=self.queries, invariant=self.invariant,
                                 num_classes=weight.shape[0], output=self.output, use_local_output=self.use_local_output,
                                 mesh=sub, **self.kwargs)
        # parallelize_module ignores a style's return value for submodules (torch's own styles change
        # the module in place): the nn.Linear object itself becomes the head
        module.__dict__.clear()
        module.__dict__.update(head.__dict__)
        module.__class__ = VocabParallelHead
        return module

    def __repr__(self) -> str:
        return f"QuantizedVocabParallel(output={self.output!r}, use_local_output={self.use_local_output}, mesh_dim={self.mesh_dim!r})"
