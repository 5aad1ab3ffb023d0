"""FSDP for the recipe (``train.engine: fsdp``): the trainable tensors are sharded across the
processes, the frozen model is replicated.

The recipe applies torch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) itself instead of
accelerate's FSDP plugin, for two reasons:

* accelerate (1.16) never enables FSDP on CPU: ``AcceleratorState.__init__`` switches
  ``distributed_type`` to ``FSDP`` only inside its ``MULTI_GPU / MULTI_NPU / ...`` branch, and
  ``PartialState._prepare_backend`` makes a ``cpu=True`` multi-process run ``MULTI_CPU`` (gloo),
  so an FSDP launch config on CPU silently trains plain DDP;
* its wrapping shards every module of the prepared model, the frozen ImageBind encoder included,
  whose 0-d ``log_logit_scale`` FSDP2 refuses; only the trainable tensors need sharding.

So the objective is wrapped in :class:`ShardedObjective` and sharded as one FSDP unit whose
frozen parameters are ``ignored_params``: each step all-gathers the trainable tensors once (in the
wrapper's forward, on every process) and reduce-scatters their averaged gradients; each process
keeps only its shard of them and of AdamW's moments. The same code runs with gloo on CPU and
NCCL on GPU, under ``accelerate launch`` with a plain multi-process config
(``alignment/configs/accelerate_fsdp.yaml``).

Checkpoints stay full: :class:`FullStateAdamW` gathers its moments into the ordinary
``optimizer.state_dict()`` layout, and :meth:`TrainableParameters.state_dict` gathers the
weights, so a checkpoint written by N FSDP processes is the same files a single process writes
and loads (with ``train.grad_accum`` scaled to keep the examples per step; see
:meth:`alignment.checkpointing.Checkpointer.load`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from anygpt.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from anygpt.alignment.trainable import TrainableParameters

logger = logging.getLogger(__name__)

__all__ = ["ShardedObjective", "FullStateAdamW", "shard_objective", "release", "check_engine", "uses_fsdp",
           "full_weights", "whole_tensor", "shard_like", "graph_leaves"]

ENGINE_FSDP = "fsdp"


def uses_fsdp(engine: str, accelerator: "Accelerator") -> bool:
    """Whether this run shards: ``train.engine: fsdp`` and more than one process (one process has
    nothing to shard across and trains as the plain path, reading and writing the same files)."""
    return engine == ENGINE_FSDP and accelerator.num_processes > 1


def check_engine(engine: str, accelerator: "Accelerator") -> None:
    """Refuse a launch whose accelerate config would fight ``train.engine: fsdp``.

    Raises:
        ConfigError: accelerate was launched with its own FSDP (whatever the engine), or with
            DeepSpeed and ``train.engine: fsdp``.
    """
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP or _env_flag("ACCELERATE_USE_FSDP"):
        raise ConfigError("accelerate's own FSDP (distributed_type: FSDP / --use_fsdp) would shard the frozen "
                          "encoder too (and on CPU it silently runs DDP); launch with "
                          "--config_file alignment/configs/accelerate_fsdp.yaml and set train.engine=fsdp")
    if engine == ENGINE_FSDP and kind == DistributedType.DEEPSPEED:
        raise ConfigError("train.engine=fsdp with a DeepSpeed accelerate config: pick one; for FSDP launch with "
                          "--config_file alignment/configs/accelerate_fsdp.yaml, for DeepSpeed set "
                          "train.engine=accelerate")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


class ShardedObjective(nn.Module):
    """The FSDP root around the training objective.

    Its forward runs the objective under the accelerator's autocast (accelerate applies it only to
    models it prepares) and evens out which trainable tensors get a gradient: FSDP's gradient
    reduce-scatter needs the same set on every process, but a batch without some modality leaves
    that projector out of one process's graph. Such tensors get ``0 ×`` themselves added to the
    loss (value and gradients unchanged); tensors that no process used keep no gradient, so AdamW
    skips them as it would under DDP or on one process (a zero gradient would still move them).
    """

    def __init__(self, objective: nn.Module, autocast: Any = contextlib.nullcontext):
        super().__init__()
        self.objective = objective
        self._autocast = autocast

    def forward(self, **batch: Any) -> dict[str, torch.Tensor]:
        import torch.distributed as dist

        with self._autocast():
            metrics = self.objective(**batch)
        loss = metrics["loss"]
        # Inside forward the registered parameters are FSDP's unsharded (gathered) tensors.
        params = [p for p in self.objective.parameters() if p.requires_grad]
        used = graph_leaves(loss)
        local = torch.tensor([id(p) in used for p in params], dtype=torch.uint8, device=loss.device)
        anywhere = local.clone()
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
        missing = [p for p, here, there in zip(params, local.tolist(), anywhere.tolist()) if there and not here]
        if missing:
            loss = loss + 0.0 * sum(p.sum() for p in missing)
        return {**metrics, "loss": loss}


def graph_leaves(tensor: torch.Tensor) -> set[int]:
    """The ids of the leaf tensors ``tensor``'s autograd graph accumulates gradients into (the
    walk DDP's ``find_unused_parameters`` makes)."""
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            found.add(id(variable))
        stack.extend(child for child, _ in node.next_functions)
    return found


def shard_objective(objective: nn.Module, trainable: "TrainableParameters",
                    accelerator: "Accelerator") -> ShardedObjective:
    """Wrap ``objective`` in :class:`ShardedObjective` and shard its trainable tensors over all
    processes; ``trainable``'s groups are pointed at the sharded parameters (build the optimizer
    after this).

    Raises:
        ConfigError: a trainable tensor is 0-d (FSDP shards along the first dimension).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    root = ShardedObjective(objective, accelerator.autocast)
    names = {id(p): name for name, p in root.named_parameters()}
    scalars = [name for name, p in trainable.named_parameters() if p.dim() == 0]
    if scalars:
        raise ConfigError(f"train.engine=fsdp cannot shard 0-d trainable tensors {scalars[:4]}; "
                          f"freeze them or set train.engine=accelerate")
    frozen = {p for p in root.parameters() if not p.requires_grad}
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    fully_shard(root, mesh=mesh, ignored_params=frozen)
    sharded = dict(root.named_parameters())
    trainable.groups = {group: [(name, sharded[names[id(p)]]) for name, p in params]
                        for group, params in trainable.groups.items()}
    logger.info("FSDP: %d trainable tensors (%d parameters) sharded over %d processes (%s); %d frozen replicated",
                sum(len(g) for g in trainable.groups.values()), trainable.num_trainable(),
                accelerator.num_processes, accelerator.device.type, len(frozen))
    return root


@contextlib.contextmanager
def full_weights(root: nn.Module | None) -> Iterator[None]:
    """The trainable tensors gathered whole on every process for the block (evaluation), then
    sharded again; a no-op for a model that is not sharded. Enter it on every process."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(root, FSDPModule):
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def release(root: ShardedObjective, trainable: "TrainableParameters") -> None:
    """End sharding for good (after training, before merging and saving the model): every
    process gets each trainable tensor whole, as a plain parameter of its module, and
    ``trainable`` points at them. Call it on every process; ``root`` must not run again.
    """
    from torch.distributed.tensor import DTensor

    # Sharded first: FSDP's state-dict hooks then find nothing to switch back (torch has no public
    # way to undo fully_shard, and they would otherwise re-register the shards on state_dict()).
    root.reshard()
    replaced: dict[int, nn.Parameter] = {}
    for module in root.modules():
        for attr, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                whole = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
                setattr(module, attr, whole)
                replaced[id(param)] = whole
    trainable.groups = {group: [(name, replaced.get(id(p), p)) for name, p in params]
                        for group, params in trainable.groups.items()}


def whole_tensor(value: Any) -> Any:
    """``value`` whole: an FSDP shard (a DTensor) is gathered from every process (call it on all
    of them, in the same order); anything else is returned as is."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) on ``param``'s device and dtype; for an FSDP shard, this
    process's shard of it (every process holds the whole value: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


class FullStateAdamW(torch.optim.AdamW):
    """AdamW whose ``state_dict`` / ``load_state_dict`` use whole tensors even when its
    parameters are FSDP shards: the saved file is what a single process writes, and a file
    written by any number of processes loads. ``state_dict`` gathers, so call it on every
    process (accelerate's ``save_state`` does)."""

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        # New dicts: the packed per-parameter dicts are the optimizer's live state.
        state["state"] = {index: {key: whole_tensor(value) for key, value in values.items()}
                          for index, values in state["state"].items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        # Adam's `step` stays whole; the moments become this process's shards.
        state = {index: {key: shard_like(value, params[int(index)]) if key != "step" else value
                         for key, value in values.items()}
                 for index, values in state_dict["state"].items()}
        super().load_state_dict({**state_dict, "state": state})
