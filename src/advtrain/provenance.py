"""Where a result came from: the versions of what computed it and the device it ran on."""
from __future__ import annotations

import platform
from importlib import metadata


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    # read from the installed packages' metadata: importing torchvision and pyautoattack only to ask costs ~0.6 s
    for dist in ("torchvision", "pyautoattack", "mlflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return out
