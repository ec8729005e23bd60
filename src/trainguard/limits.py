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
    # Protobuf (SavedModel, ONNX) and JSON model configs (Keras).
    max_proto_depth: int = 64  # nested messages
    max_proto_fields: int = 20_000_000  # fields decoded per file
    max_proto_string: int = 64 * 1024  # longer names and paths are truncated for checks
    max_graph_depth: int = 16  # ONNX subgraphs (If/Loop/Scan) inside subgraphs
    max_model_config: int = 64 * MiB  # config.json / model_config bytes before json.loads
    max_config_nodes: int = 2_000_000  # JSON values walked per config
    # safetensors, GGUF and chat templates.
    max_safetensors_header: int = 100_000_000  # the format's own cap (MAX_HEADER_SIZE)
    max_gguf_metadata: int = 256 * MiB  # header, key-value and tensor tables together
    max_gguf_kv_count: int = 100_000  # real files hold under 100
    max_gguf_tensor_count: int = 200_000  # the largest MoE models hold a few thousand
    max_gguf_array_items: int = 32_000_000  # vocabularies and merges hold ~10^5-10^6
    max_gguf_array_depth: int = 4  # ggml refuses nested arrays; gguf-py reads them
    max_gguf_string: int = 64 * MiB  # one string value (a whole tokenizer.json fits)
    max_chat_template: int = 1 * MiB  # real chat templates are 1-30 KiB
    max_template_nodes: int = 500_000  # Jinja AST nodes walked per template
    max_tokenizer_config: int = 64 * MiB  # tokenizer_config.json before json.loads


DEFAULT_LIMITS = Limits()
