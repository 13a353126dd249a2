"""A lighter launch path for the Triton kernels a decode step launches every layer.

Triton's ``kernel[grid](*args)`` binds the arguments, specialises each (dtype, 16-byte alignment of pointers, ints
equal to 1 or divisible by 16), builds a cache key from them and the options, and fetches launch metadata for its
hooks, on every call. With tens of arguments this host work outweighs the GPU time of the small kernels of a
decode step (bench/launch_overhead.py measures both paths). :class:`Launcher` keeps, per *argument class*, the
compiled kernel the first such call produced and later launches it through its compiled launcher directly.

The argument class refines Triton's specialisation (equal classes imply equal Triton keys): a tensor's dtype and
whether its address is 16-byte aligned; an int's width class (int32, int64, uint64), whether it is 1 and whether 16
divides it (its width class only, for the kernel's ``do_not_specialize`` ints); a float's type; a bool or None as
is; a constexpr parameter's value; the current CUDA device. So a launch never runs a kernel compiled for another
specialisation. ``Launcher.specialisations`` holds every class launched (on a GPU, each is a compile): a decode
whose tables grow should add none after its first steps (tests/sparse/test_gsa_offload.py). Triton's own path is
taken when Triton interprets (CPU), while launch or pre-run hooks are installed (profilers read their metadata) or
Triton's debug mode is on, for the first call of each class (which compiles), with a Triton other than the versions
checked (the compiled launcher's calling convention is Triton's internal), and everywhere when the environment sets
``UCM_PLAIN_TRITON_LAUNCH=1`` as the launchers are made (at import).

Programmatic dependent launch (PDL, sm_90 and later): a kernel with a ``PDL`` constexpr parameter calls
:func:`wait_for_previous_grid` first thing, and its launcher sets ``PDL`` and Triton's ``launch_pdl`` option
together (callers never pass ``PDL``). Launched so, the kernel may be launched before the kernel ahead of it in the
stream has finished, and its programs wait in ``griddepcontrol.wait`` until that one has and its writes are
visible; since every such kernel waits before its first load or store, nothing it touches can race the kernels
before it. ``UCM_PDL`` picks the mode: ``1`` (the default) launches the next kernel as this one's programs exit
(the gap between two launches of a decode step, a microsecond or more in a CUDA graph, overlaps the tail);
``early`` lets it launch once all of this kernel's programs have started, its programs waiting in SM slots beside
this kernel's (measured slower where a small kernel precedes a large one, by up to 10% on the H100:
bench/pdl_ab.py, BENCHMARKS.md); ``0`` turns PDL off. Off under the interpreter and on GPUs before sm_90.
``UCM_PDL`` is read once, at import (a launch reads no environment); :func:`set_pdl` changes the mode in a running
process (benchmarks comparing the modes).
"""
import inspect
import os

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.runtime import driver
from triton.runtime.jit import JITFunction

_INT32, _INT64 = 1 << 31, 1 << 63
# the compiled launcher's calling convention (CompiledKernel.run) is Triton's own; these versions were checked
_CHECKED_TRITON = ("3.6.",)
PLAIN_LAUNCH_ENV = "UCM_PLAIN_TRITON_LAUNCH"  # "1": every launch takes Triton's own path (to compare the two)
PDL_ENV = "UCM_PDL"  # programmatic dependent launch: "1" (default), "early" or "0" (module doc)
PDL_MODES = {"0": 0, "1": 1, "early": 2}  # UCM_PDL -> the kernels' PDL constexpr
_HOPPER_OR_LATER: dict = {}  # CUDA device index -> compute capability >= 9.0
_pdl_setting = "1"  # the current UCM_PDL setting (set_pdl, below the definitions: the environment's at import)


@triton.jit
def wait_for_previous_grid(PDL: tl.constexpr):
    """First thing in a kernel launched with PDL (``PDL`` 1 or 2): wait until the kernel before it in the stream
    has finished and its writes are visible; with 2, then let the next kernel launch. No-op with 0."""
    if PDL >= 1:
        gdc_wait()
    if PDL == 2:
        gdc_launch_dependents()


@triton.jit
def let_next_grid_start(PDL: tl.constexpr):
    """Let the next kernel in the stream launch now (its programs wait for this kernel's end before touching what it
    writes): for a kernel of few programs whose successor can start on inputs older than it. No-op with PDL 0."""
    if PDL >= 1:
        gdc_launch_dependents()


def set_pdl(setting: str) -> str:
    """Make ``setting`` (a ``UCM_PDL`` value: "0", "1" or "early") the PDL mode of later launches; returns the
    previous setting. Raises ValueError naming UCM_PDL for any other value."""
    global _pdl_setting
    if setting not in PDL_MODES:
        raise ValueError(f"{PDL_ENV}={setting!r}: expected one of {sorted(PDL_MODES)}")
    previous, _pdl_setting = _pdl_setting, setting
    return previous


def pdl_mode(device_index: int | None) -> int:
    """The ``PDL`` constexpr of launches on CUDA device ``device_index`` (None: not a CUDA launch, e.g. the
    interpreter): ``PDL_MODES`` of the current setting on NVIDIA GPUs of compute capability 9.0 or later, else 0."""
    setting = _pdl_setting
    if device_index is None or PDL_MODES[setting] == 0:
        return 0
    if device_index not in _HOPPER_OR_LATER:  # NVIDIA only: ROCm reports its own (gfx) versions here
        _HOPPER_OR_LATER[device_index] = (torch.version.hip is None
                                          and torch.cuda.get_device_capability(device_index)[0] >= 9)
    return PDL_MODES[setting] if _HOPPER_OR_LATER[device_index] else 0


set_pdl(os.environ.get(PDL_ENV, "1"))


class Launcher:
    """``Launcher(kernel)(grid, *params, **named)`` launches the ``@triton.jit`` ``kernel`` as
    ``kernel[grid](*params, **named)`` would: parameters positionally and/or by name (every parameter given,
    constexprs included, except ``PDL``, which the launcher sets: module doc), the other names are Triton options
    (num_warps, num_stages).

    Args:
        kernel: a ``@triton.jit`` function (under the interpreter, launched as Triton does).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled_path = (isinstance(kernel, JITFunction) and triton.__version__.startswith(_CHECKED_TRITON)
                              and os.environ.get(PLAIN_LAUNCH_ENV, "0") != "1")
        signature = inspect.signature(getattr(kernel, "fn", kernel)).parameters.values()
        self._names = [param.name for param in signature]
        # constexpr parameters are keyed by value (each value is its own kernel), the others by argument_class
        self._by_value = ([param.is_constexpr for param in kernel.params] if isinstance(kernel, JITFunction) else
                          [param.annotation is tl.constexpr or "constexpr" in str(param.annotation)
                           for param in signature])
        self._plain = _not_specialised(kernel, self._names)
        self._compiled: dict = {}
        self.specialisations: set = set()  # every (device, options, *argument classes) launched
        self._takes_pdl = "PDL" in self._names
        LAUNCHERS.append(self)

    def _set_pdl(self, named: dict, device: int | None) -> None:
        """Add the ``PDL`` constexpr and, when on, Triton's ``launch_pdl`` option to ``named``."""
        if "PDL" in named:
            raise TypeError("PDL: set by the Launcher (from the device and UCM_PDL), not by the caller")
        named["PDL"] = pdl = pdl_mode(device)
        if pdl:
            named["launch_pdl"] = True

    def __call__(self, grid: tuple, *params, **named) -> None:
        """Launch over ``grid`` (1 to 3 ints)."""
        device = driver.active.get_current_device() if isinstance(self.kernel, JITFunction) else None
        if self._takes_pdl:
            self._set_pdl(named, device)
        missing = [name for name in self._names[len(params):] if name not in named]
        if missing or len(params) > len(self._names):
            raise TypeError(f"kernel parameters {self._names}: {len(params)} given by position and {sorted(named)} "
                            f"by name; missing {missing}")
        if named:
            params = (*params, *[named.pop(name) for name in self._names[len(params):]])
        classes = [value if by_value else argument_class(value)[0] if plain and type(value) is int
                   else argument_class(value) for value, by_value, plain in zip(params, self._by_value, self._plain)]
        key = (device, tuple(named.items()), *classes)  # (the classes checked on every path)
        if not self.compiled_path or _hooks_installed(self.kernel):
            self.specialisations.add(key)
            self.kernel[grid](*params, **named)
            return
        compiled = self._compiled.get(key)
        if compiled is None:
            self.specialisations.add(key)
            self._compiled[key] = self.kernel[grid](*params, **named)
            return
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None,
                     None, None, *params)


LAUNCHERS: list[Launcher] = []  # every Launcher made, in order


def _not_specialised(kernel, names: list[str]) -> list[bool]:
    """Per parameter: listed in the kernel's ``do_not_specialize`` (by name or index; compiled or interpreted)."""
    listed = (kernel.do_not_specialize if isinstance(kernel, JITFunction)
              else getattr(kernel, "kwargs", {}).get("do_not_specialize")) or ()
    return [name in listed or index in listed for index, name in enumerate(names)]


def _hooks_installed(kernel) -> bool:
    """True when a launch or pre-run hook is set (a profiler reads its metadata) or Triton's debug mode is on:
    launches then take Triton's path."""
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    return (knobs.runtime.debug or bool(kernel.pre_run_hooks)
            or any(hook is not None and bool(getattr(hook, "calls", True)) for hook in hooks))


def argument_class(value):
    """What Triton's specialisation of a non-constexpr argument ``value`` depends on (a refinement of it): see the
    module doc. Hashable."""
    kind = type(value)
    if kind is torch.Tensor:
        return value.dtype, value.data_ptr() & 15 == 0
    if kind is int:
        width = 0 if -_INT32 <= value < _INT32 else 1 if -_INT64 <= value < _INT64 else 2
        return width, value == 1, value & 15 == 0
    if kind is float:  # a 32-bit float argument whatever its value
        return kind
    if kind is bool or value is None:
        return kind, value
    if isinstance(value, triton.language.constexpr):
        return kind, value.value
    if isinstance(value, torch.Tensor):  # a subclass: Triton reads its data_ptr too
        return value.dtype, value.data_ptr() & 15 == 0
    raise TypeError(f"Launcher: an argument of type {kind.__name__} (tensors, ints, floats, bools and None only; "
                    "launch kernels taking tuples or descriptors through kernel[grid])")
