"""Whether this machine could have a GPU for torch at all, answered without importing torch.

``device: auto`` asks torch (``torch.cuda.is_available()``), and importing torch costs about 2 CPU-s
and 300 MB in every ``process`` call and daemon start. torch can only find a GPU through a kernel
driver's device node, so when none of those exists the answer is "cpu" for certain, and torch need
not be imported. When one exists, torch is asked as before (a node alone does not prove a usable
GPU).

The nodes (each is created by the driver's kernel module, also inside containers that are given a
GPU): ``/dev/nvidiactl`` and ``/dev/nvidia<N>`` (NVIDIA driver), ``/proc/driver/nvidia`` (its
procfs entry), ``/dev/dxg`` (WSL 2's GPU paravirtualisation, through which CUDA runs on Windows
hosts) and ``/dev/kfd`` (AMD ROCm, which torch's ROCm builds report as ``cuda``). The NVIDIA
nodes may not exist yet on a host where nothing has used the GPU since boot (the user-space driver
creates them on demand through ``nvidia-modprobe``), so an NVIDIA or AMD display or 3-D controller
on the PCI bus (``/sys/bus/pci/devices/*/vendor`` 0x10de or 0x1002, ``class`` 0x03xxxx) counts too.
"""

from __future__ import annotations

import glob
import os

_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg", "/dev/kfd")


def gpu_device_nodes(root: str = "/") -> list[str]:
    """The GPU driver nodes present under ``root`` (``/`` for this machine; another root in tests).

    Returns the paths found, empty when none: then no torch build can see a GPU here.
    """
    base = root.rstrip("/")
    found = [path for path in _NODES if os.path.exists(base + path)]
    found += sorted(p[len(base) :] for p in glob.glob(base + "/dev/nvidia[0-9]*"))
    for device in sorted(glob.glob(base + "/sys/bus/pci/devices/*")):
        if _read(device + "/vendor") in _GPU_VENDORS and _read(device + "/class").startswith("0x03"):
            found.append(device[len(base) :])
    return found


_GPU_VENDORS = ("0x10de", "0x1002")  # NVIDIA, AMD


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip().lower()
    except (OSError, UnicodeDecodeError):
        return ""
