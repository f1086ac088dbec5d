"""Which torch device a job may run on: one clear error instead of a traceback later."""

from __future__ import annotations


class BadDevice(ValueError):
    """The device is not a torch device, or not present on this machine."""


def check_device(device: str) -> str:
    """`device` ('cpu', 'cuda', 'cuda:1') as a canonical string, if this machine has it."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadDevice(f"device '{device}': not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise BadDevice(f"device '{device}': only cpu and cuda are supported")
    if not torch.cuda.is_available():
        raise BadDevice(f"device '{device}': no CUDA GPU is available on this machine (use cpu)")
    count = torch.cuda.device_count()
    index = 0 if dev.index is None else dev.index
    if index >= count:
        raise BadDevice(f"device '{device}': only {count} GPU(s) here (cuda:0 .. cuda:{count - 1})")
    return f"cuda:{index}"
