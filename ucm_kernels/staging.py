"""Small host tensors (block ids, lengths, tables) onto the device without waiting for it.

A copy from pageable host memory waits until the stream's earlier work has finished, which stalls a host that
prepares the next step while the device runs this one (as vLLM's does), so both helpers go through page-locked
memory. :func:`host_to_device` is the one-off form; :class:`HostStaging` is for a caller that moves several small
tensors every step: it packs them into a page-locked buffer it keeps (page-locking fresh memory costs a few hundred
microseconds of host time per tensor) and moves them with one copy.
"""
import torch

_ALIGN = 16  # bytes: every packed tensor starts at a multiple, so any dtype can view its slice


def host_to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a small CPU tensor, e.g. ``[n]`` int64 block ids) copied to ``device``; on CUDA through page-locked
    memory, without waiting for the stream's queued work."""
    device = torch.device(device)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostStaging:
    """Moves a batch of small CPU tensors to ``device`` in one copy through page-locked buffers it reuses.

    Two buffers are used in turn; a buffer is refilled only after the copy that read it has run (an event), so the
    host waits only when it is two batches ahead of the device. On a CPU ``device`` the same packing runs through
    an ordinary buffer (the result is a copy either way: later changes to the inputs do not reach it).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self._pinned = self.device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def upload(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each of ``tensors`` (CPU, any shape and dtype) as a tensor on the device, in the same order."""
        for index, tensor in enumerate(tensors):
            if tensor.device.type != "cpu":
                raise ValueError(f"tensors[{index}]: on {tensor.device}, expected a CPU tensor")
        offsets, total = _layout(tensors)
        staged = self._buffer(total)
        for tensor, start in zip(tensors, offsets):
            _bytes_of(staged, start, tensor).copy_(tensor.reshape(-1))
        landed = torch.empty(total, dtype=torch.uint8, device=self.device)
        landed.copy_(staged[:total], non_blocking=self._pinned)
        if self._pinned:
            self._copied[self._turn] = torch.cuda.Event()
            self._copied[self._turn].record()
        self._turn ^= 1
        return tuple(_bytes_of(landed, start, tensor).view(tensor.shape) for tensor, start in zip(tensors, offsets))

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """This turn's staging buffer, at least ``nbytes`` long, once the copy that last read it has run."""
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()
        buffer = self._buffers[self._turn]
        if buffer is None or buffer.numel() < nbytes:
            size = max(nbytes, 2 * buffer.numel() if buffer is not None else 4096)
            buffer = self._buffers[self._turn] = torch.empty(size, dtype=torch.uint8, pin_memory=self._pinned)
        return buffer


def _layout(tensors: tuple[torch.Tensor, ...]) -> tuple[list[int], int]:
    """Byte offset of each tensor in the packed buffer (aligned to _ALIGN) and the buffer's length."""
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
    return offsets, max(total, _ALIGN)


def _bytes_of(buffer: torch.Tensor, start: int, like: torch.Tensor) -> torch.Tensor:
    """The ``[like.numel()]`` slice of the uint8 ``buffer`` at byte ``start``, viewed as ``like``'s dtype."""
    return buffer[start:start + like.numel() * like.element_size()].view(like.dtype)
