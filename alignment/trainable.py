"""What trains in a stage, and nothing else.

:func:`configure_trainable` freezes the whole model, then unfreezes exactly the parts a
:class:`~alignment.config.TrainableConfig` names:

* input / output projectors, per modality;
* the signal tokens' rows of the input embeddings and of the LM head, as a separate small
  parameter (:class:`SignalRows`, a trainable offset per signal token added by forward hooks):
  the embedding matrices themselves stay frozen, so every other row is bitwise unchanged by
  construction, and neither a full-vocabulary weight gradient nor optimizer state for the whole
  matrix is ever computed. The offsets are folded into the matrices when the model is saved;
* LoRA adapters (PEFT) injected into the LLM in place.

:func:`merge_into_model` folds the offsets and merges LoRA. :class:`TrainableParameters`
names the parameter groups for the optimizer and saves / loads only the trainable tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from anygpt.errors import ConfigError
from anygpt.seeding import seeded

from anygpt.alignment.config import ALL, LoraConfig, TrainableConfig

if TYPE_CHECKING:
    from anygpt.model import AnyGPTModel

logger = logging.getLogger(__name__)

__all__ = ["TrainableParameters", "SignalRows", "configure_trainable", "merge_into_model", "signal_row_ids"]


@dataclass
class TrainableParameters:
    """The trainable parameters of a model, by optimizer group.

    Attributes:
        groups: group name (``input_projectors``, ``output_projectors``, ``signal_embeddings``,
            ``lora``) → ``(qualified name, parameter)`` pairs; only non-empty groups appear.
        modules: trainable modules that live outside the model (the :class:`SignalRows`); the
            training objective registers them, so that DDP sees their parameters.
        peft_model: the PEFT wrapper when LoRA is on (needed to merge), else None.
    """

    groups: dict[str, list[tuple[str, nn.Parameter]]] = field(default_factory=dict)
    modules: nn.ModuleDict = field(default_factory=nn.ModuleDict)
    peft_model: Any = None

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for params in self.groups.values():
            yield from params

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.named_parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable tensors on the CPU, by qualified name; FSDP shards are gathered whole (a
        collective then: call it on every process)."""
        from anygpt.alignment.fsdp import whole_tensor

        return {name: whole_tensor(p.detach()).cpu().contiguous() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors written by :meth:`state_dict` into the parameters.

        Raises:
            ConfigError: the keys do not match (a checkpoint of a different stage config).
        """
        expected = {name for name, _ in self.named_parameters()}
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ConfigError(f"checkpoint does not match this config's trainable parameters (missing: "
                              f"{missing[:4]}, unexpected: {unexpected[:4]}); resume with the config it "
                              f"was written with (saved next to it as train_config.yaml)")
        from anygpt.alignment.fsdp import shard_like

        with torch.no_grad():
            for name, param in self.named_parameters():
                param.copy_(shard_like(state[name], param))


class SignalRows(nn.Module):
    """Trainable float32 offsets of the signal tokens' rows of the input embeddings and LM head.

    Forward hooks on the LLM's embedding and LM-head modules add them: the looked-up embedding of
    a signal token becomes ``W[id] + input[i]`` and its logit gains ``hidden · output[i]``. With
    tied embeddings one offset serves both, as the shared matrix would. :meth:`fold` writes the
    offsets into the matrices and removes the hooks.

    Args:
        llm: the Hugging Face causal LM.
        ids: the signal token ids.
    """

    def __init__(self, llm: nn.Module, ids: torch.Tensor):
        super().__init__()
        self.embedding, self.head = llm.get_input_embeddings(), llm.get_output_embeddings()
        weight = self.embedding.weight
        table = torch.full((weight.shape[0],), -1, dtype=torch.long)
        table[ids] = torch.arange(len(ids))
        self.register_buffer("ids", ids.to(weight.device), persistent=False)
        self.register_buffer("table", table.to(weight.device), persistent=False)
        self.input = nn.Parameter(torch.zeros(len(ids), weight.shape[1], device=weight.device))
        self.tied = self.head is not None and self.head.weight.data_ptr() == weight.data_ptr()
        self.output = None
        if self.head is not None and not self.tied:
            self.output = nn.Parameter(torch.zeros(len(ids), self.head.weight.shape[1], device=weight.device))
        self._handles = [self.embedding.register_forward_hook(self._add_to_embeddings)]
        if self.head is not None:
            self._handles.append(self.head.register_forward_hook(self._add_to_logits))

    # The modules are the LLM's; keep them out of this module's parameters and state.
    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("embedding", "head"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _add_to_embeddings(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        slots = self.table[args[0].to(self.table.device)]  # (..., ) index into the offsets, -1 elsewhere
        mask = slots >= 0
        if not bool(mask.any()):
            return out
        return out.index_put((mask,), out[mask] + self.input[slots[mask]].to(out.dtype))

    def _add_to_logits(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        hidden = args[0]
        offsets = self.input if self.output is None else self.output
        extra = hidden @ offsets.to(hidden.dtype).T  # (..., n_signal)
        return out.index_add(-1, self.ids.to(out.device), extra.to(out.dtype))

    @torch.no_grad()
    def fold(self) -> None:
        """Add the offsets to the matrices' rows, zero them and remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        rows = self.embedding.weight
        rows[self.ids] += self.input.to(rows.dtype)
        if self.output is not None:
            head = self.head.weight
            head[self.ids] += self.output.to(head.dtype)
        for param in self.parameters():
            param.zero_()


def signal_row_ids(model: "AnyGPTModel") -> torch.Tensor:
    """Token ids of every signal token (all output modalities), sorted."""
    ids = sorted({i for run in model.lm.signal_ids.values() for i in run})
    return torch.tensor(ids, dtype=torch.long)


def configure_trainable(model: "AnyGPTModel", config: TrainableConfig, seed: int = 0) -> TrainableParameters:
    """Freeze ``model``, then unfreeze what ``config`` names (see the module docstring).

    LoRA adapters are initialised from ``seed``.

    Raises:
        ConfigError: a named modality has no such projector, or LoRA targets match no module.
    """
    model.requires_grad_(False)
    result = TrainableParameters()
    if config.lora is not None:
        with seeded(seed):  # LoRA's initialisation, without touching the global random state
            result.peft_model = _inject_lora(model, config.lora)
    for group, modules in (("input_projectors", model.input_projectors),
                           ("output_projectors", model.output_projectors)):
        chosen = _modalities(getattr(config, group), modules, f"trainable.{group}")
        _add(result, group, [(n, p) for m in chosen for n, p in _named(modules[m], f"{group}.{m}")])
    if config.signal_embeddings:
        result.modules["signal_rows"] = SignalRows(model.lm.model, signal_row_ids(model))
        _add(result, "signal_embeddings", _named(result.modules["signal_rows"], "signal_rows"))
    if config.lora is not None:
        _add(result, "lora", [(n, p) for n, p in model.named_parameters() if "lora_" in n])
    for _, param in result.named_parameters():
        param.requires_grad_(True)
    logger.info("trainable: %s (%d parameters)",
                ", ".join(f"{g} {sum(p.numel() for _, p in ps)}" for g, ps in result.groups.items()),
                result.num_trainable())
    return result


def _named(module: nn.Module, prefix: str) -> list[tuple[str, nn.Parameter]]:
    return [(f"{prefix}.{n}", p) for n, p in module.named_parameters()]


def _add(result: TrainableParameters, group: str, params: list[tuple[str, nn.Parameter]]) -> None:
    if params:
        result.groups[group] = params


def _modalities(value: list[str] | str, modules: nn.ModuleDict, path: str) -> list[str]:
    available = list(modules)
    chosen = available if value == ALL else list(value)
    unknown = [m for m in chosen if m not in modules]
    if unknown:
        raise ConfigError(f"{path}: the model has no projector for {unknown}; valid: {available} or `all`")
    return chosen


def _inject_lora(model: "AnyGPTModel", config: LoraConfig) -> Any:
    """Wrap the LLM with PEFT LoRA; the adapters live inside ``model.lm.model`` (in place)."""
    try:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model
    except ImportError as exc:
        raise ConfigError("trainable.lora needs the `peft` package: pip install peft") from exc
    peft_config = PeftLoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=list(config.target_modules), bias="none")
    try:
        peft_model = get_peft_model(model.lm.model, peft_config)
    except ValueError as exc:
        raise ConfigError(f"trainable.lora.target_modules {config.target_modules}: {exc}") from None
    if peft_model.base_model.model is not model.lm.model:  # PEFT injects in place; rely on it
        raise RuntimeError("PEFT did not inject LoRA in place; cannot train the composed model")
    return peft_model


def merge_into_model(model: "AnyGPTModel", trainable: TrainableParameters) -> dict[str, tuple]:
    """Fold the signal-row offsets into the embedding matrices and merge LoRA into the LLM's
    weights, leaving a plain model (the trainable set is empty afterwards).

    Returns:
        Every LoRA merged into the LLM so far, ``module path → (A, B, scale)``: those it was
        loaded with and the ones merged now (``model.lm.merged_lora``, updated here), so that a
        saved model can store them instead of the whole LLM.
    """
    from anygpt.checkpoint import stack_lora

    if "signal_rows" in trainable.modules:
        trainable.modules["signal_rows"].fold()
        del trainable.modules["signal_rows"]
        trainable.groups.pop("signal_embeddings", None)
    factors: dict[str, tuple] = {}
    if trainable.peft_model is not None:
        factors = lora_factors(trainable.peft_model)
        merged = trainable.peft_model.merge_and_unload()
        model.lm.model = merged
        model.llm = merged
        trainable.groups.pop("lora", None)
        trainable.peft_model = None
        logger.info("merged LoRA adapters into the LLM")
    model.lm.merged_lora = stack_lora(model.lm.merged_lora, factors)
    return model.lm.merged_lora


def lora_factors(peft_model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """The LoRA factors of a PEFT model, by the wrapped model's module paths: ``(A, B, scale)``."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.base_model.model
    factors = {}
    for path, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                factors[path] = (module.lora_A[adapter].weight.detach().cpu().clone(),
                                 module.lora_B[adapter].weight.detach().cpu().clone(),
                                 float(module.scaling[adapter]))
    return factors
