"""What the hooks' data, model and criterion may look like, in one place: batches as
``(inputs, targets)`` or dicts, inputs as a tensor, a tuple or a dict, model outputs of any
nesting (the prediction picked from them), losses as a tensor or a dict of tensors."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import InputError


def describe(obj: Any) -> str:
    """A short description of a value a hook returned, for an error line."""
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {list(obj.shape)}"
    if isinstance(obj, Mapping):
        return f"a dict with keys {', '.join(map(repr, list(obj)[:6]))}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)}"
    return f"a {type(obj).__name__}"


def split_batch(batch: Any, inputs_key: str | None, targets_key: str | None
                ) -> tuple[Any, Any]:
    """``(inputs, targets)`` of one batch: a pair as it is, a dict by the keys of
    ``batch.inputs`` and ``batch.targets``."""
    if isinstance(batch, Mapping):
        if inputs_key is None or targets_key is None:
            raise InputError(f"get_data_loader yields {describe(batch)}: set config keys "
                             "'batch.inputs' and 'batch.targets' to the keys of the inputs "
                             "and the targets")
        missing = [k for k in (inputs_key, targets_key) if k not in batch]
        if missing:
            raise InputError(f"get_data_loader yields {describe(batch)}, without "
                             f"{', '.join(map(repr, missing))} (config keys 'batch.inputs', "
                             "'batch.targets')")
        return batch[inputs_key], batch[targets_key]
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise InputError(f"get_data_loader yields {describe(batch)}; expected (inputs, targets) "
                     "or a dict (config keys 'batch.inputs' and 'batch.targets')")


class Pairs:
    """A loader's batches as ``(inputs, targets)`` pairs (``split_batch``); its length and
    ``dataset`` passed through."""

    def __init__(self, loader: Iterable, inputs_key: str | None = None,
                 targets_key: str | None = None) -> None:
        self.loader, self.keys = loader, (inputs_key, targets_key)
        self.dataset = getattr(loader, "dataset", None)
        self.sampler = getattr(loader, "sampler", None)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for batch in self.loader:
            yield split_batch(batch, *self.keys)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a dict as keyword arguments, a tuple or list as arguments."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs: Any) -> int:
    """Images in a batch of ``inputs`` (the first tensor's first dimension)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() else 1
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    if isinstance(values, Iterable):
        for value in values:
            if isinstance(value, torch.Tensor):
                return batch_size(value)
    return 1


def main_prediction(outputs: Any, key: str | int | None = None) -> torch.Tensor:
    """The prediction among a model's outputs: ``outputs[key]`` when a key (a dict key or a
    sequence index) is given; else the tensor itself, a dict's only tensor or its ``'out'``
    (torchvision's segmentation models), a sequence's only item. Anything else is ambiguous:
    ``ValueError`` saying so."""
    if key is not None:
        try:
            found = outputs[key]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"the model returns {describe(outputs)}, which has no {key!r}"
                             ) from None
        if not isinstance(found, torch.Tensor):
            raise ValueError(f"the model's output {key!r} is {describe(found)}, not a tensor")
        return found
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        tensors = [k for k, v in outputs.items() if isinstance(v, torch.Tensor)]
        if "out" in tensors:
            return outputs["out"]
        if len(tensors) == 1:
            return outputs[tensors[0]]
    elif isinstance(outputs, Sequence) and len(outputs) == 1 and \
            isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ValueError(f"the model returns {describe(outputs)}: which is the prediction is "
                     "ambiguous")


def total_loss(value: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The criterion's value as one scalar to minimise and its named parts: a tensor is its
    own total; a dict of tensors (losses by name) is summed, each part kept for the log."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.reshape(()), {}
    if isinstance(value, Mapping) and value and all(
            isinstance(v, torch.Tensor) and v.numel() == 1 for v in value.values()):
        parts = {str(k): v.reshape(()) for k, v in value.items()}
        return torch.stack(list(parts.values())).sum(), parts
    raise InputError(f"get_criterion's loss returned {describe(value)}; it must return a "
                     "scalar tensor or a dict of scalar tensors (summed)")
