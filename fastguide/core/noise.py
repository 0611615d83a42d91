"""Gaussian noise drawn the way diffusers draws it, so seeded loops match sample for sample."""

from __future__ import annotations

from typing import List, Sequence, Union

import torch

Generator = Union[None, torch.Generator, Sequence[torch.Generator]]


def check_generator(generator: Generator, batch: int, device: torch.device) -> None:
    """``None``, one ``torch.Generator``, or one per sample; a CUDA generator cannot feed CPU tensors."""
    if generator is None:
        return
    gens: List = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if not all(isinstance(g, torch.Generator) for g in gens):
        raise TypeError("generator must be a torch.Generator or a list of them")
    if isinstance(generator, (list, tuple)) and len(gens) not in (1, batch):
        raise ValueError(f"generator: a list needs one generator per sample ({batch}), got {len(gens)}")
    for g in gens:
        if g.device.type != "cpu" and g.device.type != device.type:
            raise ValueError(f"generator is on {g.device} but the sample is on {device}")


def randn(shape, generator: Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise of ``shape``.

    A CPU generator with a CUDA sample draws on the CPU and copies (reproducible across devices); a list of
    generators draws each sample's noise from its own generator, so a sample's noise does not depend on
    how the batch is split.
    """
    gens = generator
    if isinstance(gens, (list, tuple)) and len(gens) == 1:
        gens = gens[0]
    if isinstance(gens, (list, tuple)):
        draw_device = gens[0].device
        one = (1,) + tuple(shape[1:])
        parts = [torch.randn(one, generator=g, device=draw_device, dtype=dtype) for g in gens]
        return torch.cat(parts).to(device)
    draw_device = gens.device if gens is not None else device
    return torch.randn(tuple(shape), generator=gens, device=draw_device, dtype=dtype).to(device)
