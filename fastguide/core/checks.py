"""Argument checks: one function per kind of argument, each raising ``TypeError``/``ValueError`` naming it.

Every public entry point checks all of its arguments with these before any work starts, so a bad call
leaves the caller's tensors, generators and schedulers untouched.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch

from .cache import LRUCache
from .layout import NUM_COLS

Scale = Union[float, int, torch.Tensor]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def host_checks_allowed(t: torch.Tensor) -> bool:
    """Value checks read tensors on the host: cheap on CPU, but a device sync on CUDA and impossible while
    tracing, so device tensors' values (per-sample scales, labels) are only checked on the CPU. The native
    loop checks its CFG scale once, up front, on any device (``check_scale(..., sync_ok=True)``)."""
    return t.is_cpu and not is_compiling()


# ---------------------------------------------------------------------------------------------------
# Numbers


class NotANumberError(TypeError, ValueError):
    """A numeric argument that is not a number at all (a string, a bool, None): a wrong type, and a wrong
    value for that parameter, so ``except TypeError`` and ``except ValueError`` both catch it."""


def check_real(name: str, value, *, minimum: Optional[float] = None, maximum: Optional[float] = None,
               allow_inf: bool = False) -> float:
    """A real number (not a bool), not NaN, finite unless ``allow_inf``, within ``[minimum, maximum]``;
    returned as a float."""
    kind = type(value)
    if kind is not float and kind is not int and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        raise NotANumberError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    v = float(value)
    bad = math.isnan(v) or (math.isinf(v) and not allow_inf)
    bad = bad or (minimum is not None and v < minimum) or (maximum is not None and v > maximum)
    if bad:
        if minimum is not None and maximum is not None:
            what = f"a float in [{minimum:g}, {maximum:g}]"
        elif minimum is not None:
            what = f"a finite float >= {minimum:g}" if not allow_inf else f"a float >= {minimum:g}"
        else:
            what = "a finite float" if not allow_inf else "a float (not NaN)"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return v


def check_nonneg(name: str, value) -> float:
    """A finite float >= 0 (scales, weights, eta, noise amplitudes)."""
    return check_real(name, value, minimum=0.0)


def check_fraction(name: str, value) -> float:
    """A float in [0, 1] (rescale factors, guidance windows)."""
    return check_real(name, value, minimum=0.0, maximum=1.0)


def check_window(name_lo: str, lo, name_hi: str, hi) -> Tuple[float, float]:
    """``0 <= lo <= hi <= 1``."""
    lo, hi = check_fraction(name_lo, lo), check_fraction(name_hi, hi)
    if lo > hi:
        raise ValueError(f"{name_lo} must be <= {name_hi}, got {lo} > {hi}")
    return lo, hi


def check_spec_scale_tensor(name: str, scale: torch.Tensor) -> torch.Tensor:
    """A guidance spec's tensor scale: one value or one per sample (0-D or [B]), floating point. Its values and
    batch size are checked where the loop knows the batch."""
    if scale.dim() > 1 or not scale.is_floating_point():
        raise ValueError(f"{name} must be a float or a [B] floating-point tensor")
    return scale


def check_int(name: str, value, *, minimum: Optional[int] = None) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise NotANumberError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_range(name: str, value) -> Tuple[float, float]:
    """A (low, high) pair of numbers with low < high (clip ranges)."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else None
    if pair is None or len(pair) != 2 or \
            not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in pair) or \
            not pair[0] < pair[1]:
        raise ValueError(f"{name} must be a (low, high) pair of numbers with low < high, got {value!r}")
    return float(pair[0]), float(pair[1])


# ---------------------------------------------------------------------------------------------------
# Tensors


def check_tensor(name: str, t, *, like: Optional[torch.Tensor] = None, float_only: bool = True,
                 allow_none: bool = False, same_dtype: bool = False) -> None:
    """A tensor (floating point unless ``float_only=False``); with ``like``, on its device and of its shape
    (and dtype with ``same_dtype``)."""
    if t is None:
        if allow_none:
            return
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if float_only and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32/float16/bfloat16/float64), got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but sample is on {like.device}")
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the sample's shape {tuple(like.shape)}, got {tuple(t.shape)}")
        if same_dtype and t.dtype != like.dtype:
            raise TypeError(f"{name} must have the sample's dtype {like.dtype}, got {t.dtype}")


def check_sample(name: str, sample) -> int:
    """A ``[B, ...]`` floating-point state with at least one dimension past the batch; returns B."""
    check_tensor(name, sample)
    if sample.dim() < 2:
        raise ValueError(f"{name} must have a batch dimension and at least one more, got {tuple(sample.shape)}")
    return sample.shape[0]


def check_model_output(model_output, sample: torch.Tensor, cfg: bool, learned_variance: bool,
                       sparse: bool = False) -> None:
    """``[uncond; cond]`` (2B rows) with CFG, else B rows, with the sample's per-row shape (channels doubled
    for a learned variance), on the sample's device. ``sparse`` (an ``uncond_rows`` map): at least B rows,
    the B cond rows first."""
    check_tensor("model_output", model_output)
    if model_output.device != sample.device:
        raise ValueError(f"model_output is on {model_output.device} but sample is on {sample.device}")
    batch = sample.shape[0]
    rows = 2 * batch if cfg else batch
    if sparse and model_output.shape[0] < batch:
        raise ValueError(f"model_output must have B cond rows and then the uncond rows uncond_rows points at: "
                         f"sample has B={batch}, model_output has {model_output.shape[0]} rows")
    if not sparse and model_output.shape[0] != rows:
        what = ("2B rows [uncond; cond] because guidance_scale is given" if cfg
                else "B rows because no guidance_scale is given")
        raise ValueError(f"model_output must have {what}: sample has B={batch}, model_output has "
                         f"{model_output.shape[0]} rows")
    expected = sample.shape[1:]
    if learned_variance:
        expected = (2 * expected[0],) + tuple(expected[1:])
    if model_output.shape[1:] != expected:
        extra = " (channels doubled for the learned variance)" if learned_variance else ""
        raise ValueError(f"model_output must have per-sample shape {tuple(expected)}{extra}, "
                         f"got {tuple(model_output.shape[1:])}")


def check_row_map(name: str, index, batch: int, lo: int, hi: int, device: torch.device,
                  allow_none_entry: bool = False) -> torch.Tensor:
    """A ``[batch]`` int32/int64 index tensor on ``device`` with values in ``[lo, hi)`` (or -1 with
    ``allow_none_entry``), returned as contiguous int64. Values are read only where that costs no sync."""
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{name} must be a [{batch}] integer tensor, got {type(index).__name__}")
    if index.dtype not in (torch.int32, torch.int64) or index.shape != (batch,):
        raise ValueError(f"{name} must be a [{batch}] int32/int64 tensor, got {index.dtype} {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but sample is on {device}")
    if host_checks_allowed(index) and batch:
        values = index.detach().numpy()
        bad = ~((values >= lo) & (values < hi))
        if allow_none_entry:
            bad &= values != -1
        if bad.any():
            allowed = f"[{lo}, {hi})" + (" or -1" if allow_none_entry else "")
            raise ValueError(f"{name} must hold values in {allowed}, got {values.tolist()}")
    return index.to(torch.int64).contiguous()


def check_scale(name: str, scale: Scale, batch: int, device: torch.device, sync_ok: bool = False) -> torch.Tensor:
    """A guidance scale as a [B] fp32 tensor on ``device``; floats and [B] tensors, finite and >= 0.

    A tensor's values are checked when it lives on the CPU, or anywhere with ``sync_ok``."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a [B] tensor, got {type(scale).__name__}")
    if isinstance(scale, torch.Tensor):
        if scale.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {scale.dtype}")
        if scale.dim() == 0:
            scale = scale.reshape(1).expand(batch)
        if scale.dim() != 1 or scale.shape[0] != batch:
            raise ValueError(f"{name} must be a float or a tensor of shape [{batch}], got {tuple(scale.shape)}")
        if scale.device != device:
            raise ValueError(f"{name} is on {scale.device} but sample is on {device}")
        if (sync_ok and not is_compiling() or host_checks_allowed(scale)) \
                and not bool(torch.all(torch.isfinite(scale) & (scale >= 0))):
            raise ValueError(f"{name} must be finite and >= 0, got {scale.tolist()}")
        return scale.float()
    value = check_nonneg(name, scale)
    if is_compiling():
        return torch.full((batch,), value, device=device, dtype=torch.float32)
    return _constant_scale(value, batch, device)


def _constant_scale(value: float, batch: int, device: torch.device) -> torch.Tensor:
    """A float scale as a [B] view of one cached element (stride 0): no allocation or copy per call."""
    key = (value, batch, device)
    t = _CONSTANT_SCALES.get(key)
    if t is None:
        t = _CONSTANT_SCALES.put(key, torch.full((1,), value, dtype=torch.float32, device=device).expand(batch))
    return t


_CONSTANT_SCALES = LRUCache(256)


def check_finite(name: str, t: torch.Tensor) -> None:
    if host_checks_allowed(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_table(table, step, device: torch.device, batch: Optional[int] = None) -> Optional[torch.Tensor]:
    """A ``[steps, NUM_COLS]`` fp32 coefficient table on ``device`` and a host or device step index into it.
    With ``batch`` > 1 the step may also be a ``[batch]`` integer tensor (one row per sample), which is
    returned as int64 (None otherwise)."""
    check_tensor("table", table)
    if table.dim() != 2 or table.shape[1] != NUM_COLS or table.dtype != torch.float32:
        raise ValueError(f"table must be a float32 tensor of shape [steps, {NUM_COLS}], "
                         f"got {table.dtype} {tuple(table.shape)}")
    if table.device != device:
        raise ValueError(f"table is on {table.device} but sample is on {device}")
    if isinstance(step, torch.Tensor) and batch is not None and batch > 1 and step.numel() > 1:
        return check_row_map("step", step, batch, 0, table.shape[0], device)
    if isinstance(step, torch.Tensor):
        if step.dtype not in (torch.int32, torch.int64) or step.numel() != 1:
            raise TypeError(f"step must be an int, a one-element integer tensor or a [B] integer tensor "
                            f"(one row per sample), got {step.dtype} {tuple(step.shape)}")
        if step.device != device:
            raise ValueError(f"step is on {step.device} but sample is on {device}")
    elif isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"step must be an int or a one-element integer tensor, got {type(step).__name__}")
    elif not 0 <= step < table.shape[0]:
        raise ValueError(f"step must be in [0, {table.shape[0]}), got {step}")
    return None


def check_labels_tensor(name: str, y, batch: int, device: torch.device) -> None:
    """Labels (or any per-sample condition) with ``batch`` rows on ``device``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of labels, got {type(y).__name__}")
    if y.shape[:1] != (batch,) or y.device != device:
        raise ValueError(f"{name} must have {batch} rows on {device}, got {tuple(y.shape)} on {y.device}")


def check_clip(clip: Optional[Sequence[float]]) -> Optional[Tuple[float, float]]:
    return None if clip is None else check_range("clip", clip)


def check_device(name: str, device) -> torch.device:
    """``device`` as a ``torch.device`` that can hold tensors here: a valid device string / ``torch.device`` /
    index, and for an accelerator type (``cuda``, ``mps``, ``xpu``, ...) one that torch reports available,
    with its index in range (an index-less ``"cuda"`` becomes the current device, where its tensors live).
    Raises ``ValueError`` naming ``name`` (instead of torch's ``AssertionError: Torch not compiled with CUDA
    enabled`` at the first copy)."""
    if isinstance(device, bool) or not isinstance(device, (str, torch.device, int)):
        raise TypeError(f"{name} must be a device string, a torch.device or an int index, got "
                        f"{type(device).__name__} {device!r}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{name}={device!r} is not a valid torch device: {exc}") from None
    if dev.type in ("cpu", "meta"):
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{name}={device!r}: no {dev.type} device is available here "
                         f"(torch.{dev.type}.is_available() is False)")
    count = getattr(backend, "device_count", None)
    if dev.index is not None and count is not None and not dev.index < count():
        raise ValueError(f"{name}={device!r}: there are only {count()} {dev.type} device(s) here")
    current = getattr(backend, "current_device", None)
    if dev.index is None and current is not None:
        # Tensors made on "cuda" live on "cuda:<current>", and torch.device("cuda") != torch.device("cuda:0"):
        # tables cached under the index-less device would not be found for the samples' device.
        dev = torch.device(dev.type, current())
    return dev
