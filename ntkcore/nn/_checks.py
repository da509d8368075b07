"""The device check of the torch front end (the numeric checks are ``ntkcore._validate``'s).

Same style: the error names the argument and says "expected ..., got ...".
"""

from __future__ import annotations

import torch

from ..errors import BackendError


def check_device(device):
    """``device`` as a torch.device: ParameterError for a string torch does not parse (or a
    type other than cpu/cuda), BackendError for a CUDA device torch cannot use here."""
    from ..ntk.empirical import _parse_device  # the rule empirical_ntk applies

    dev = _parse_device(device, torch.device("cpu"))
    if dev.type == "cuda" and not (torch.cuda.is_available()
                                   and (dev.index or 0) < torch.cuda.device_count()):
        raise BackendError(f"device: expected an available CUDA device, got {str(dev)!r} but "
                           f"torch sees {torch.cuda.device_count()} GPU(s)")
    return dev
