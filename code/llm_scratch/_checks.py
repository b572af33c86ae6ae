"""Argument checks shared by the modules of this package.

Each check raises ``ValueError`` with a message that names the invalid value
and states what is valid.
"""

import math
import numbers

import torch
from torch import Tensor


def is_int(value: object) -> bool:
    """Return whether ``value`` is an integer scalar, such as an ``int`` or a NumPy integer.

    Any ``numbers.Integral`` counts except ``bool``: it is a subclass of
    ``int``, but ``True`` passed as a size or a count is almost always a
    mistake.
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int``, or raise ``ValueError`` unless it is an integer of at least 1."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid; expected a positive int")
    return int(value)


def check_bool(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``.

    A string such as ``"no"`` is truthy, so accepting it would silently do the
    opposite of what the caller meant.
    """
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid; expected True or False")


def check_probability(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number other than a bool.

    The range ``0 <= value < 1`` is checked by the caller, whose message
    states it.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}={value!r} is invalid; expected a float with 0 <= {name} < 1")


def check_scale(scale: object) -> None:
    """Raise ``ValueError`` unless ``scale`` is ``None`` or a finite real number."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(
            f"scale={scale!r} is invalid; expected a finite float, or None for 1 / sqrt(E)"
        )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type without autocast, such as "meta"
        return False


def check_input_dtype(x: Tensor, weight: Tensor) -> None:
    """Raise ``ValueError`` unless the input ``x`` of a layer has the dtype of the layer's ``weight``.

    Under ``torch.autocast`` the dtypes may differ, because autocast casts the
    inputs of every projection itself.
    """
    if x.dtype == weight.dtype or _autocast_enabled(x.device.type):
        return
    if not x.is_floating_point():
        raise ValueError(
            f"x has dtype {x.dtype}, but the layer's weights have dtype {weight.dtype}; "
            f"convert the input with x.to({weight.dtype})"
        )
    raise ValueError(
        f"x has dtype {x.dtype}, but the layer's weights have dtype {weight.dtype}; convert the "
        f"input with x.to({weight.dtype}) or the module with .to({x.dtype})"
    )
