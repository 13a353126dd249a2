"""A tier of one framed object per block in a remote object service (S3, Mooncake).

:class:`FramedObjectTier` keeps the block contract over raw object requests: sizes come from the objects' headers,
reads are checked against the header's length and CRC (``framing``), a corrupt object is dropped, and ``put``
publishes a block only when it is absent. A subclass gives the raw requests:

* ``contains(key) -> bool``; ``remove(key)``; ``object_name(key)``; ``_where(key)`` (how errors name the object)
* ``_object_size(key) -> int | None``                object bytes, None when absent or the service is unreachable
* ``_object_bytes(key) -> bytes``                    the whole object; BlockMissing when absent or unreachable
* ``_put_object(key, header, payload) -> bool``      write the object (False: it was there already)
"""
import abc

import torch

from ucm_store.backends import framing
from ucm_store.backends.base import Tier


class FramedObjectTier(Tier):
    """Blocks as framed objects; see the module doc for what a subclass provides."""

    def size(self, key: str) -> int | None:
        nbytes = self._object_size(key)
        if nbytes is None:
            return None
        with self._drop_if_corrupt(key):
            return framing.object_payload_len(self._where(key), nbytes)

    def read(self, key: str, dst: torch.Tensor) -> None:
        blob = self._object_bytes(key)
        with self._drop_if_corrupt(key):
            framing.unframe_into(key, self._where(key), memoryview(blob), dst)

    def put(self, key: str, src: torch.Tensor) -> bool:
        if self.contains(key):
            return False
        header, payload = framing.frame(key, src)
        return self._put_object(key, header, payload)

    @abc.abstractmethod
    def _where(self, key: str) -> str:
        """How errors name block ``key``'s object."""

    @abc.abstractmethod
    def _object_size(self, key: str) -> int | None:
        """Bytes of block ``key``'s object; None when it is absent or the service cannot be reached."""

    @abc.abstractmethod
    def _object_bytes(self, key: str) -> bytes:
        """Block ``key``'s whole object; BlockMissing when it is absent or the service cannot be reached."""

    @abc.abstractmethod
    def _put_object(self, key: str, header: bytes, payload: memoryview) -> bool:
        """Write block ``key``'s object from its two parts; False when it was there already."""
