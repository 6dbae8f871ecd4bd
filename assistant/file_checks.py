"""Whether weight and config files on disk are whole, checked before a loader reads them: a safetensors file's
header against its size, a JSON config that parses, a model folder with everything a load needs.

peft injects a LoRA into the shared model before it reads the adapter's weights, so a damaged file must be
caught before peft sees it (``assistant.chat.adapters``); a damaged converted model is converted again
(``assistant.model``). Each check returns what is wrong in words, or None when the files are whole. Reads
headers only (a few KB per file), never the weights; knows no torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file (missing, cut short, a garbage header), or None when it is whole:
    its header parses and its tensors cover the file exactly, as safetensors itself requires."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(size - 8, _MAX_HEADER):
                return f"{path.name} is cut short or is not a safetensors file ({size:,} bytes)"
            header = json.loads(f.read(n))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})"
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return f"{path.name} has a garbage header"
    end = _data_end(header)
    if end is None:
        return f"{path.name} has a garbage header"
    expected = 8 + n + end
    if size < expected:
        return f"{path.name} is cut short ({size:,} of {expected:,} bytes)"
    if size > expected:
        return f"{path.name} has {size - expected:,} bytes more than its header describes"
    return None


def _data_end(header) -> int | None:
    """Where the last tensor's bytes end, or None when the header does not describe tensors consistently."""
    if not isinstance(header, dict):
        return None
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        shape = t.get("shape") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)):
            return None
        width = _DTYPE_BYTES.get(t.get("dtype"))
        if width is not None and offsets[1] - offsets[0] != width * math.prod(shape):
            return None
        end = max(end, offsets[1])
    return end


def json_problem(path: Path, required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a JSON object file (missing, not JSON, lacking a ``required`` key), or None."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})"
    except ValueError:
        return f"{path.name} is not valid JSON"
    if not isinstance(data, dict):
        return f"{path.name} is not a JSON object"
    lacking = [k for k in required if k not in data]
    return f"{path.name} lacks {', '.join(lacking)}" if lacking else None


def adapter_problem(folder: Path) -> str | None:
    """What is wrong with a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "its folder is missing"
    problem = json_problem(folder / "adapter_config.json", ("peft_type",))
    if problem is None and not (folder / "adapter_model.safetensors").exists() and \
            (folder / "adapter_model.bin").is_file():
        return None  # peft's older pickle format: no header to check, left to peft
    return problem or safetensors_problem(folder / "adapter_model.safetensors")


def model_folder_problem(folder: Path) -> str | None:
    """What is wrong with a transformers model folder (config, tokenizer, every safetensors shard), or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder is missing"
    problem = json_problem(folder / "config.json", ("model_type",))
    if problem:
        return problem
    tokenizer = [folder / n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).exists()]
    if not tokenizer:
        return "tokenizer.json is missing"
    for path in tokenizer:
        if problem := json_problem(path):
            return problem
    shards = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        if problem := json_problem(index, ("weight_map",)):
            return problem
        weight_map = json.loads(index.read_bytes())["weight_map"]
        listed = weight_map.values() if isinstance(weight_map, dict) else []
        shards = sorted({*shards, *(folder / name for name in listed if isinstance(name, str))})
    if not shards:
        return "model.safetensors is missing"
    for shard in shards:
        if problem := safetensors_problem(shard):
            return problem
    return None
