"""Python side of the CUDA host emulation: loads the module that ``build.build()`` made, drives the runtime's
control API through ctypes, and stands in for ``fastguide.backends.cuda._run``.

Before each kernel call, ``Emulator.run`` registers the global memory the kernel may touch, derived from its
argument block by the contract of ``csrc/fastguide_abi.h`` (rows x row length for every tensor, the [B]
vectors, the selected coefficient row, read-only inputs and writable outputs); the memory checker fails the
launch on any other access. Memory that belongs to one sample (a heterogeneous step's table row, a sparse
CFG batch's uncond row, a combine's coefficients) is registered for the blocks of that sample's grid row
only. Faults come back as RuntimeError with the kernel and source line resolved; ``last_accesses`` has the
accesses per region of the latest launch.
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fastguide.core.layout import NUM_COLS

ELEMENT_BYTES = {0: 4, 1: 2, 2: 2}  # fastguide::DType -> bytes
SCHEDULES = ("forward", "reverse")


@dataclass(frozen=True)
class LaunchRecord:
    kernel: str                      # demangled name of the kernel instantiation
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    cluster: Tuple[int, int, int]
    result: int                      # cudaError_t of the launch; -1: the kernel faulted
    threads: int


class Emulator:
    def __init__(self, path: Path):
        self.path = Path(path)
        spec = importlib.util.spec_from_file_location("_C", self.path)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)
        # dlopen of the same file returns the handle the import made: one runtime, shared state.
        lib = self.lib = ctypes.CDLL(str(self.path))
        lib.emu_device_name.restype = ctypes.c_char_p
        lib.emu_region_add.argtypes = [ctypes.c_char_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64,
                                       ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
        lib.emu_num_regions.restype = ctypes.c_int64
        lib.emu_region_accesses.restype = ctypes.c_int64
        lib.emu_region_accesses.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_int]
        lib.emu_log_size.restype = ctypes.c_int64
        lib.emu_log_entry.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
        lib.emu_take_host_fault.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self.devices = [lib.emu_device_name(i).decode() for i in range(lib.emu_num_devices())]
        self._symbols: Optional[Dict[int, str]] = None
        # Checked accesses per region name (summed over same-named regions) of the latest ``run``.
        self.last_accesses: Dict[str, int] = {}

    # ------------------------------------------------------------------------------------------- control

    def configure(self, device: int = 0, schedule: str = "forward") -> None:
        """Emulated device (index into ``devices``) and thread order for the following launches."""
        assert self.lib.emu_set_device(device) == 0, device
        assert self.lib.emu_set_schedule(SCHEDULES.index(schedule)) == 0, schedule
        self.lib.emu_reset_last_error()

    def add_region(self, name: str, base: int, rows: int, row_bytes: int, stride_bytes: int,
                   writable: bool, sample_row: int = -1) -> None:
        """Memory the next launches may touch; ``sample_row`` >= 0: only from the blocks that work on that
        sample row (grid row ``sample_row % gridDim.y``)."""
        self.lib.emu_region_add(name.encode(), base, rows, row_bytes, stride_bytes, int(writable), sample_row)

    def region_accesses(self) -> Dict[str, int]:
        """Checked accesses of the kernels launched since the regions were registered, per region name."""
        counts: Dict[str, int] = {}
        buf = ctypes.create_string_buffer(256)
        for i in range(self.lib.emu_num_regions()):
            n = self.lib.emu_region_accesses(i, buf, len(buf))
            name = buf.value.decode()
            counts[name] = counts.get(name, 0) + n
        return counts

    def clear_regions(self) -> None:
        self.lib.emu_regions_clear()

    def launches(self) -> List[LaunchRecord]:
        out = []
        buf = (ctypes.c_int64 * 14)()
        for i in range(self.lib.emu_log_size()):
            self.lib.emu_log_entry(i, buf)
            v = list(buf)
            out.append(LaunchRecord(self.symbol(v[0]), tuple(v[1:4]), tuple(v[4:7]), tuple(v[7:10]), v[10], v[11]))
        return out

    def clear_log(self) -> None:
        self.lib.emu_log_clear()

    def take_host_fault(self) -> str:
        buf = ctypes.create_string_buffer(1024)
        return buf.value.decode() if self.lib.emu_take_host_fault(buf, len(buf)) else ""

    # ---------------------------------------------------------------------------------- symbolisation

    def symbol(self, offset: int) -> str:
        if self._symbols is None:
            listing = subprocess.run(["nm", "-C", "--defined-only", str(self.path)], capture_output=True,
                                     text=True, check=True).stdout
            self._symbols = {}
            for line in listing.splitlines():
                parts = line.split(" ", 2)
                if len(parts) == 3 and parts[1] in "tTwW":
                    self._symbols[int(parts[0], 16)] = parts[2]
        return self._symbols.get(offset, f"+0x{offset:x}")

    def source_line(self, offset: int) -> str:
        """file:line of a code offset (the CUDA sources carry line tables)."""
        try:
            out = subprocess.run(["addr2line", "-e", str(self.path), f"0x{offset:x}"], capture_output=True,
                                 text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return "" if out.startswith("??") else out

    def explain(self, message: str) -> str:
        """A fault message with the kernel's name and the source line of the faulting access."""
        m = re.search(r"\[kernel \+0x([0-9a-f]+)\]", message)
        if m:
            message += f"\n  kernel: {self.symbol(int(m.group(1), 16))}"
        m = re.search(r"\[pc \+0x([0-9a-f]+)\]", message)
        if m:
            line = self.source_line(int(m.group(1), 16) - 1)  # the return address follows the call
            if line:
                message += f"\n  access: {line}"
        return message

    # ---------------------------------------------------------------------------- backend_cuda._run

    def run(self, kernel, launch, device) -> None:
        """``fastguide.backends.cuda._run`` for the emulated module: stream 0, the kernel's memory registered."""
        self.register(launch.args)
        self.last_accesses = {}
        try:
            kernel(launch.args, 0)
            self.last_accesses = self.region_accesses()
        except RuntimeError as exc:
            if "[cuda-emu]" in str(exc):
                raise RuntimeError(self.explain(str(exc))) from None
            raise
        finally:
            self.clear_regions()
        fault = self.take_host_fault()
        if fault:
            raise RuntimeError(f"[cuda-emu] undefined behaviour in host code: {fault}")
        launch.finish()

    def register(self, a) -> None:
        """The global memory a kernel may touch, from its argument block (csrc/fastguide_abi.h)."""
        kind = type(a).__name__
        region = self._region
        if kind == "GuidedStepArgs":
            es = ELEMENT_BYTES[a.dtype]
            region("sample", a.sample, a.batch, a.n * es, a.sample_stride * es)
            # Prediction rows: the prediction (n elements), and in a cond row (or the only row) also the
            # learned variance channels after it; an uncond row's variance is never read.
            pred, full = a.n * es, a.n * es * (2 if a.learned_variance else 1)
            mo, mo_stride = a.model_output, a.model_output_stride * es
            if not a.has_cfg:
                region("model_output", mo, a.batch, full, mo_stride)
            elif a.uncond_rows:
                # Sparse CFG: B cond rows, then uncond rows; each sample may read only its own (if any).
                region("uncond_rows", a.uncond_rows, 1, a.batch * 8, 0)
                region("model_output (cond rows)", mo, a.batch, full, mo_stride)
                for b, u in enumerate(_int64s(a.uncond_rows, a.batch)):
                    if u >= 0:
                        region(f"model_output[{u}] (uncond of sample {b})", mo + u * mo_stride, 1, pred, 0,
                               sample_row=b)
            else:
                region("model_output (uncond rows)", mo, a.batch, pred, mo_stride)
                region("model_output (cond rows)", mo + a.batch * mo_stride, a.batch, full, mo_stride)
            if a.has_cfg:
                region("scale", a.scale, a.batch, 4, a.scale_stride * 4)  # absent (null) with a combine
            if a.has_cfg and a.combine:
                # Per-sample linear combine (a, b, d): sample b's row for sample b only; extra (the d term's e)
                # is read only with a combine.
                for b in range(a.batch):
                    region("combine", a.combine + 12 * b, 1, 12, 0, sample_row=b)
                region("extra", a.extra, a.batch, a.n * es, a.extra_stride * es)
            region("mfactor", a.mfactor, 1, a.batch * 4, 0)
            # The terms that only feed x_out (g_mean, the multistep history x0_prev / x0_prev2) are read only
            # when out is written: an x0-only call that touches them faults.
            for name in ("g_score", "noise") + (("g_mean", "x0_prev", "x0_prev2") if a.out else ()):
                region(name, getattr(a, name), a.batch, a.n * es, getattr(a, f"{name}_stride") * es)
            if a.clip_mode == 2:
                region("threshold", a.threshold, 1, a.batch * 4, 0)
            row_bytes = NUM_COLS * 4
            if a.step_rows:
                # One row per sample (step_ptr / step are not read): sample b's row, for sample b only.
                region("step_rows", a.step_rows, 1, a.batch * 8, 0)
                for b, step in enumerate(_int64s(a.step_rows, a.batch)):
                    region(f"table[{step}] (sample {b})", a.table + step * row_bytes, 1, row_bytes, 0,
                           sample_row=b)
            else:
                step = a.step
                if a.step_ptr:
                    region("step", a.step_ptr, 1, 8, 0)
                    step = ctypes.c_int64.from_address(a.step_ptr).value
                # Only the selected row of the coefficient table.
                region(f"table[{step}]", a.table + step * row_bytes, 1, row_bytes, 0)
            region("out", a.out, a.batch, a.n * es, a.out_stride * es, writable=True)
            region("x0_out", a.x0_out, a.batch, a.n * es, a.x0_out_stride * es, writable=True)
            if a.out:  # the second copy of the result is written only together with out
                region("out2", a.out2, a.batch, a.n * es, a.out2_stride * es, writable=True)
        elif kind == "CfgRescaleFactorArgs":
            es = ELEMENT_BYTES[a.dtype]
            # Only the prediction (the first n elements) of each of the 2B rows.
            region("model_output", a.model_output, 2 * a.batch, a.n * es, a.model_output_stride * es)
            region("scale", a.scale, a.batch, 4, a.scale_stride * 4)
            region("factor", a.factor, 1, a.batch * 4, 0, writable=True)
        elif kind == "GuidanceGramArgs":
            es = ELEMENT_BYTES[a.dtype]
            # The prediction (the first n elements) of each of the 2B rows; extra is written only with a momentum.
            region("model_output", a.model_output, 2 * a.batch, a.n * es, a.model_output_stride * es)
            region("extra", a.extra, a.batch, a.n * es, a.extra_stride * es, writable=bool(a.has_momentum))
            region("out", a.out, 1, a.batch * 9 * 4, 0, writable=True)
        elif kind == "TemperatureLseGradArgs":
            es = ELEMENT_BYTES[a.dtype]
            region("logits", a.logits, a.rows, a.k * es, a.logits_stride * es)
            region("labels", a.labels, 1, a.rows * 8, 0)
            region("scale", a.scale, 1, a.rows * 4, 0)
            region("out", a.out, a.rows, a.k * es, a.out_stride * es, writable=True)
        elif kind == "PerSampleRmsArgs":
            es = ELEMENT_BYTES[a.dtype]
            region("x", a.x, a.rows, a.n * es, a.x_stride * es)
            region("out", a.out, 1, a.rows * 4, 0, writable=True)
        else:
            raise TypeError(f"no memory contract for {kind}")

    def _region(self, name: str, base: int, rows: int, row_bytes: int, stride_bytes: int,
                writable: bool = False, sample_row: int = -1) -> None:
        if base:  # 0: the tensor is absent and must not be touched
            self.add_region(name, base, rows, row_bytes, stride_bytes, writable, sample_row)


def _int64s(address: int, count: int) -> List[int]:
    """``count`` int64 values at ``address`` (host memory: the emulated device is the CPU)."""
    return list((ctypes.c_int64 * count).from_address(address)) if count > 0 else []
