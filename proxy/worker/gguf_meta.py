"""What a GGUF file says of its memory, read without loading the weights: ``python -m proxy.worker.gguf_meta FILE...``.

Runs in its own process (the proxy spawns it with the model's interpreter, once per file; the result is
cached in ``models/.cache/memory.json``), so a file that is slow or hostile to read costs a process the proxy
can kill, never the proxy. The header is read by ``gguf_header`` (the standard library: no numpy, no gguf;
a long tokenizer array is skipped, not decoded), in milliseconds where gguf-py's reader took seconds. Prints
one JSON object per file, a line each.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from proxy.worker.gguf_header import ARRAY, Header, Skipped, Unreadable, read_file

_LAYER = re.compile(r"^blk\.(\d+)\.")
_SHOWN_LIST = 64  # longer arrays (the tokenizer's vocabulary) are shown as null, as Ollama's /api/show does
_NOT_SHOWN = ("GGUF.", "tokenizer.chat_template")


def _shown(header: Header) -> dict[str, Any]:
    """The metadata as Ollama's /api/show ``model_info`` has it: every key, long arrays as null, and
    ``general.parameter_count`` from the tensors."""
    info: dict[str, Any] = {}
    for key, value in header.fields.items():
        if key.startswith(_NOT_SHOWN):
            continue
        long_array = header.types[key] == ARRAY and (header.array_length(key) or 0) > _SHOWN_LIST
        readable = not isinstance(value, Skipped | Unreadable)
        info[key] = value if readable and not long_array else None
    info["general.parameter_count"] = sum(t.n_elements for t in header.tensors)
    return dict(sorted(info.items()))


def _scalar(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def read(path: str) -> dict[str, Any]:
    header = read_file(path)
    fields: dict[str, Any] = {}
    for key, value in header.fields.items():
        if key.startswith("tokenizer.") or isinstance(value, Skipped | Unreadable):
            continue
        fields[key] = value
    arch = str(fields.get("general.architecture", "llama"))

    def get(name: str, default: Any = None) -> Any:
        return _scalar(fields.get(f"{arch}.{name}", default))

    n_layer = int(get("block_count", 0) or 0)
    layers = [0] * n_layer
    other = 0
    output = 0
    for tensor in header.tensors:
        size = tensor.n_bytes
        m = _LAYER.match(tensor.name)
        if m and int(m.group(1)) < n_layer:
            layers[int(m.group(1))] += size
        else:
            other += size
            if tensor.name.startswith("output"):
                output += size
    n_head = get("attention.head_count", 0) or 0
    n_head_kv = get("attention.head_count_kv", n_head) or n_head
    n_embd = int(get("embedding_length", 0) or 0)
    heads = max(n_head) if isinstance(n_head, list) else int(n_head)
    head_dim = n_embd // heads if heads else 0
    kv_heads = [int(h) for h in n_head_kv] if isinstance(n_head_kv, list) else [int(n_head_kv)] * n_layer
    return {
        "architecture": arch,
        "n_layer": n_layer,
        "n_embd": n_embd,
        "n_head": heads,
        "n_head_kv": kv_heads,
        "key_length": int(get("attention.key_length", head_dim) or head_dim),
        "value_length": int(get("attention.value_length", head_dim) or head_dim),
        "n_vocab": int(get("vocab_size", 0) or header.array_length("tokenizer.ggml.tokens") or 0),
        "context_length": int(get("context_length", 0) or 0),
        "layer_bytes": layers,
        "other_bytes": other,  # token embeddings, output norm and head
        "output_bytes": output,
        "metadata": _shown(header),
    }


def main(argv: list[str]) -> int:
    for path in argv:
        try:
            print(json.dumps({"path": path, "facts": read(path)}), flush=True)
        except Exception as exc:  # a file that is no GGUF: the proxy falls back to the file's size
            print(json.dumps({"path": path, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
