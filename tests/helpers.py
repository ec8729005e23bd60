"""Small pickle builders for scanner tests (stdlib only, nothing is ever loaded here)."""

from __future__ import annotations

import pickle
import struct


def short_str(s: str) -> bytes:
    raw = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def stack_global(module: str, name: str) -> bytes:
    return short_str(module) + short_str(name) + pickle.STACK_GLOBAL


def call1(module: str, name: str, arg: str, proto: int = 4) -> bytes:
    """``module.name(arg)`` as a protocol-4 pickle."""
    return (
        pickle.PROTO
        + bytes([proto])
        + stack_global(module, name)
        + short_str(arg)
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )


def global0(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def binint(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)
