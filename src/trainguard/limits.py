"""Every bound on untrusted input, each a named constant.

The scanner reads attacker-controlled bytes; each length, depth, count,
decompressed size and time it will accept is capped here.  A cap that is hit is
a finding (TG002) or a clean error, never a crash, a hang or a silent "clean".
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class Limits:
    # Pickle machine.
    max_pickle_opcodes: int = 50_000_000
    max_stack_depth: int = 100_000
    max_memo_entries: int = 5_000_000
    max_kept_bytes_arg: int = 1 * MiB  # longer byte strings are skipped, not copied
    max_kept_container_items: int = 64  # items kept per container for evidence
    max_pickles_per_stream: int = 64
    max_nested_pickle_depth: int = 3
    # Containers.
    max_archive_depth: int = 6
    max_archive_members: int = 100_000
    max_member_size: int = 64 * GiB
    max_decompressed_size: int = 4 * GiB  # per compressed member or stream
    max_compression_ratio: int = 1000  # bytes out per byte in, past 1 MiB out
    max_zip_comment_scan: int = 66_000
    sniff_size: int = 4096
    max_in_memory_member: int = 512 * MiB  # members of non-seekable archives are buffered
    # Whole scan.
    max_seconds_per_file: float = 600.0
    max_npy_header: int = 1 * MiB


DEFAULT_LIMITS = Limits()
