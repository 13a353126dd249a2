"""Numba JIT on first call, so that importing UCM never imports numba / llvmlite.

vLLM scans every loaded module's attributes when its worker starts; llvmlite's ``ffi.lib`` answers any
attribute, ``__dict__`` included, with a wrapper that breaks that scan. Deferring numba's import to the first
call of a kernel (after vLLM has started) avoids it, and keeps ``import ucm`` fast.
"""
import functools
import threading

_compile_lock = threading.Lock()


def lazy_njit(**options):
    """Like ``numba.njit(**options)``, but numba is imported and the function compiled at its first call.

    The plain-Python function stays available as ``.py_func``; the compiled one as ``.compiled()``.
    """

    def decorate(py_func):
        compiled = None

        def get_compiled():
            nonlocal compiled
            with _compile_lock:
                if compiled is None:
                    import numba

                    compiled = numba.njit(**options)(py_func)
            return compiled

        @functools.wraps(py_func)
        def call(*args):
            return (compiled or get_compiled())(*args)

        call.py_func = py_func
        call.compiled = get_compiled
        return call

    return decorate
