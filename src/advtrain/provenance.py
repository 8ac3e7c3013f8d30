"""Where a result came from: the versions of what computed it and the device it ran on."""
from __future__ import annotations

import platform


def versions() -> dict:
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("torchvision", "pyautoattack", "mlflow"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return out
