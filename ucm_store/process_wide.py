"""One instance per process, made on first use: the store's pinned pool and its statistics monitor."""
import threading


class ProcessWide:
    """Mixin: :meth:`get_instance` returns the class's process-wide instance, made with no arguments on first use
    (thread-safe). Each subclass has its own instance and lock (``_instance``, ``_instance_lock``)."""

    _instance = None
    _instance_lock = threading.Lock()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._instance = None
        cls._instance_lock = threading.Lock()

    @classmethod
    def get_instance(cls):
        """The process's instance (made now if there is none)."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance
