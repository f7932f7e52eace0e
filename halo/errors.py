"""Exceptions raised by halo."""

from __future__ import annotations

__all__ = ["HaloNotSupportedError", "HaloShapeError", "InputError"]


class HaloNotSupportedError(NotImplementedError):
    """A module or functional call that halo cannot shard exactly.

    The message always names the module path (or the function), its type and what
    would work instead. halo refuses rather than compute something different from
    the one-device network.
    """


class HaloShapeError(ValueError):
    """A local block whose size does not divide as a layer needs, or a halo wider than a block."""


class InputError(ValueError):
    """Bad input that every rank finds alike (a manifest with problems, an empty split).

    Launchers print its message once, from rank 0, without a traceback, and exit with
    status 2; nothing has been trained or written when it is raised.
    """
