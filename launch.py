"""Attune's command line: parse flags, build configs, wire the parts, run one command. Nothing else.

    python launch.py [serve]            start the UI (/) and the API (/v1)
    python launch.py users add|key|list
    python launch.py import NAME FILE.jsonl
    python launch.py train NAME | adapters NAME [--rollback V]
    python launch.py memory rebuild NAME
    python launch.py export NAME | forget NAME
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

COMMANDS = ("serve", "users", "import", "train", "adapters", "memory", "export", "forget")


def parse_args(argv: list[str]) -> argparse.Namespace:
    from storage.paths import default_data_dir

    def common_flags(defaults: bool) -> argparse.ArgumentParser:
        # Sub-commands use SUPPRESS so a flag given before the command is not reset by the sub-parser.
        c = argparse.ArgumentParser(add_help=False)
        c.add_argument("--data-dir", type=Path, default=None if defaults else argparse.SUPPRESS,
                       help=f"where all state lives (env ATTUNE_DATA_DIR; default {default_data_dir()})")
        c.add_argument("--model", default="embedded" if defaults else argparse.SUPPRESS,
                       help="'embedded' (SmolLM2-135M-Instruct), a local folder or .gguf file, or a hub id")
        return c

    common = common_flags(False)
    p = argparse.ArgumentParser(prog="launch.py", description="Attune: a local-first assistant that learns you.",
                                parents=[common_flags(True)])
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("serve", parents=[common], help="start the UI and the API")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--quant", default="auto", choices=["auto", "nf4", "int8", "none"])
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on CUDA and on CPUs with native bf16, else float32)")
    s.add_argument("--context-tokens", type=int, default=2048, help="prompt + answer budget in tokens")
    s.add_argument("--max-new-tokens", type=int, default=256, help="default answer length limit")
    s.add_argument("--temperature", type=float, default=0.7, help="default sampling temperature (0 = greedy)")
    s.add_argument("--allow-signup", action="store_true", default=None,
                   help="let anyone create an account (default: only on a loopback address)")
    s.add_argument("--train-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainConfig field for background jobs, e.g. --train-set epochs=2")
    s.add_argument("--no-memory", action="store_true", help="do not retrieve or record personal memories")
    s.add_argument("--no-personalizer", action="store_true", help="do not train adapters in the background")
    s.add_argument("--train-after", type=int, default=8, metavar="N",
                   help="train a user's adapter once N new answers/feedback events arrived (default 8)")
    s.add_argument("--train-interval", type=float, default=30.0, metavar="MINUTES",
                   help="at least this long between two background jobs of one user (default 30)")
    s.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                   help="who generates: transformers in this process, or vLLM (make vllm; README)")
    s.add_argument("--vllm-url", default=None, metavar="URL",
                   help="with --engine vllm: a running vLLM server (default: start one from .venv-vllm)")

    u = sub.add_parser("users", parents=[common], help="manage users")
    us = u.add_subparsers(dest="action", required=True)
    us.add_parser("add", parents=[common], help="create a user (password from stdin or a prompt)").add_argument("name")
    us.add_parser("key", parents=[common], help="print a new API key for a user (shown once)").add_argument("name")
    us.add_parser("list", parents=[common], help="list users")

    i = sub.add_parser("import", parents=[common], help="add conversation history from a JSONL file")
    i.add_argument("name")
    i.add_argument("file", type=Path)
    t = sub.add_parser("train", parents=[common], help="run one training job for a user now (foreground)")
    t.add_argument("name")
    t.add_argument("--quant", default="auto", choices=["auto", "nf4", "int8", "none"])
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainConfig field (personalize/config.py), e.g. --set epochs=2")
    a = sub.add_parser("adapters", parents=[common], help="list a user's adapter versions; roll back")
    a.add_argument("name")
    a.add_argument("--rollback", metavar="VERSION", help="serve this version again ('base' for none)")
    m = sub.add_parser("memory", parents=[common], help="personal memory maintenance")
    ms = m.add_subparsers(dest="action", required=True)
    ms.add_parser("rebuild", parents=[common], help="rebuild a user's FAISS index from SQLite").add_argument("name")
    sub.add_parser("export", parents=[common], help="print all of a user's data as JSON").add_argument("name")
    f = sub.add_parser("forget", parents=[common], help="delete all of a user's data")
    f.add_argument("name")
    f.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    if not any(a in COMMANDS for a in argv) and not any(a in ("-h", "--help") for a in argv):
        argv = ["serve", *argv]  # `python launch.py [flags]` serves
    args = p.parse_args(argv)
    args.data_dir = args.data_dir or default_data_dir()
    return args


def read_password(name: str) -> str:
    if sys.stdin.isatty():
        pw = getpass.getpass(f"Password for {name}: ")
        if pw != getpass.getpass("Repeat it: "):
            raise SystemExit("The passwords differ; nothing was changed.")
        return pw
    return sys.stdin.readline().rstrip("\n")


def train_config(overrides: list[str]):
    """TrainConfig from ``FIELD=VALUE`` strings (values parsed as JSON when they can be)."""
    from personalize.config import TrainConfig

    values = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. --set epochs=2")
        try:
            values[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            values[key.strip()] = raw
    return TrainConfig.from_dict(values)


def vllm_config(args: argparse.Namespace):
    """A VLLMConfig for ``--engine vllm`` (None: the transformers engine)."""
    if args.engine != "vllm":
        if args.vllm_url:
            raise ValueError("--vllm-url: only used with --engine vllm")
        return None
    from assistant.vllm_backend import VLLMConfig

    return VLLMConfig(url=args.vllm_url, dtype=args.dtype)


def memory_service(store):
    from assistant.memory import MemoryConfig, MemoryService

    return MemoryService(store, MemoryConfig())


def run(args: argparse.Namespace) -> int:
    from storage import Store
    from storage.transfer import export_user, forget_user, import_history

    store = Store(args.data_dir)
    if args.command == "serve":
        from assistant.backend import GenerationSettings
        from assistant.engine import ChatConfig
        from assistant.memory import MemoryConfig
        from assistant.model import ModelConfig
        from assistant.server import ServerConfig, serve
        from personalize.scheduler import SchedulerConfig

        serve(
            store,
            ModelConfig(model=args.model, quant=args.quant, device=args.device, threads=args.threads,
                        dtype=args.dtype),
            ChatConfig(context_tokens=args.context_tokens,
                       defaults=GenerationSettings(max_new_tokens=args.max_new_tokens,
                                                   temperature=args.temperature)),
            ServerConfig(host=args.host, port=args.port, personalizer=not args.no_personalizer,
                         allow_signup=args.allow_signup),
            None if args.no_memory else MemoryConfig(),
            train_config(args.train_set),
            SchedulerConfig(min_new_events=args.train_after, min_interval_minutes=args.train_interval),
            vllm_config(args),
        )
    elif args.command == "users" and args.action == "add":
        user = store.users.create(args.name, read_password(args.name))
        print(f"Created user {user.name} (id {user.id}).")
    elif args.command == "users" and args.action == "key":
        key = store.users.new_api_key(store.users.by_name(args.name).id)
        print(key)
        print("Store this key now: only its hash is kept. Use it as the OpenAI API key with base_url .../v1.",
              file=sys.stderr)
    elif args.command == "users" and args.action == "list":
        for user in store.users.list():
            print(f"{user.id}\t{user.name}\t{user.created_at}")
    elif args.command == "import":
        user = store.users.by_name(args.name)
        counts = import_history(store, user.id, args.file)
        counts["memories"] = memory_service(store).backfill(user.id)["added"]
        print(json.dumps({"user": args.name, **counts}))
    elif args.command == "train":
        from assistant.model import ModelConfig
        from personalize import api

        def progress(step, total, loss):
            print(f"attune: step {step}/{total} loss {loss:.4f}" if loss is not None else
                  f"attune: step {step}/{total}", file=sys.stderr, flush=True)

        result = api.train_now(store, args.name, ModelConfig(model=args.model, quant=args.quant, device=args.device),
                               train_config(args.set), on_progress=progress)
        print(json.dumps(result))
    elif args.command == "adapters":
        from personalize import api

        user = store.users.by_name(args.name)
        if args.rollback:
            print(json.dumps(api.rollback(store, user.id, args.rollback)))
        else:
            print(json.dumps(api.list_versions(store, user.id), indent=1))
    elif args.command == "memory" and args.action == "rebuild":
        print(json.dumps(memory_service(store).rebuild(store.users.by_name(args.name).id)))
    elif args.command == "export":
        print(json.dumps(export_user(store, store.users.by_name(args.name).id), ensure_ascii=False, indent=1))
    elif args.command == "forget":
        user = store.users.by_name(args.name)
        if not args.yes and (not sys.stdin.isatty() or input(f"Delete ALL data of {user.name}? [y/N] ") != "y"):
            print("Nothing deleted (pass --yes to skip the question).")
            return 1
        memory_service(store).forget_all(user.id)
        forget_user(store, user.id)
        print(f"Forgot {user.name}: conversations, feedback, memories and adapters deleted.")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from storage.errors import AttuneError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except AttuneError as e:
        print(f"attune: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # a config's __post_init__ names the bad field
        print(f"attune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
