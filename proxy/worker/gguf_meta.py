"""What a GGUF file says of its memory, read without loading the weights: ``python -m proxy.worker.gguf_meta FILE...``.

Runs in its own process (the proxy spawns it with the model's interpreter, once per file; the result is
cached in ``models/.cache/memory.json``), because ``gguf`` (llama.cpp's own reader) needs numpy, which
the proxy process never imports. Prints one JSON object per file, a line each.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

_LAYER = re.compile(r"^blk\.(\d+)\.")
_SHOWN_LIST = 64  # longer arrays (the tokenizer's vocabulary) are shown as null, as Ollama's /api/show does
_NOT_SHOWN = ("GGUF.", "tokenizer.chat_template")


def _shown(reader: Any) -> dict[str, Any]:
    """The metadata as Ollama's /api/show ``model_info`` has it: every key, long arrays as null, and
    ``general.parameter_count`` from the tensors."""
    from gguf import GGUFValueType

    info: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith(_NOT_SHOWN):
            continue
        if field.types and field.types[0] == GGUFValueType.ARRAY and len(field.data) > _SHOWN_LIST:
            info[key] = None
            continue
        try:
            info[key] = field.contents()
        except Exception:  # a field type this reader cannot render
            info[key] = None
    info["general.parameter_count"] = sum(int(t.n_elements) for t in reader.tensors)
    return dict(sorted(info.items()))


def _scalar(value: Any) -> Any:
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def read(path: str) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or key.startswith("GGUF."):
            continue
        try:
            fields[key] = field.contents()
        except Exception:  # a field type this reader cannot render: not one we need
            continue
    arch = str(fields.get("general.architecture", "llama"))

    def get(name: str, default: Any = None) -> Any:
        return _scalar(fields.get(f"{arch}.{name}", default))

    n_layer = int(get("block_count", 0) or 0)
    layers = [0] * n_layer
    other = 0
    output = 0
    for tensor in reader.tensors:
        size = int(tensor.n_bytes)
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
        "n_vocab": int(get("vocab_size", 0) or len(_scalar(reader.fields["tokenizer.ggml.tokens"].contents()) or [])),
        "context_length": int(get("context_length", 0) or 0),
        "layer_bytes": layers,
        "other_bytes": other,  # token embeddings, output norm and head
        "output_bytes": output,
        "metadata": _shown(reader),
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
