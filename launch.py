"""Attune's command line: parse flags, build configs, wire the parts, run one command. Nothing else.

    .venv/bin/python launch.py [serve]            start the UI (/) and the API (/v1); no command means serve
    .venv/bin/python launch.py users add|key|list
    .venv/bin/python launch.py import NAME FILE.jsonl
    .venv/bin/python launch.py train NAME | adapters NAME [--rollback V]
    .venv/bin/python launch.py memory rebuild NAME
    .venv/bin/python launch.py export NAME | forget NAME
    .venv/bin/python launch.py worker --db URL [--device cuda:N]   run queued training jobs until stopped

Flags that set a config field are derived from the config dataclasses (name, type, default, choices and
the field's docstring as help), so a default has one home: the dataclass.
"""

from __future__ import annotations

import argparse
import ast
import getpass
import inspect
import json
import os
import sys
import textwrap
from dataclasses import MISSING, fields
from functools import cache
from pathlib import Path

COMMANDS = ("serve", "users", "import", "train", "adapters", "memory", "export", "forget", "backup", "restore",
            "worker")
_TYPES = {"int": int, "float": float, "str": str}


# flags from configs ------------------------------------------------------------------------------
@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (``field: type = default`` then ``\"\"\"doc\"\"\"``)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


def config_flag(parser: argparse.ArgumentParser, cls: type, name: str, flag: str | None = None,
                choices: tuple | None = None, metavar: str | None = None) -> None:
    """Add the flag of config field ``cls.name`` (``--field-name`` unless ``flag``) with its type, default and
    docstring. A field that defaults to True becomes ``--no-...``; one that defaults to False/None a switch."""
    f = {f.name: f for f in fields(cls)}[name]
    default = None if f.default is MISSING else f.default
    doc = field_docs(cls).get(name, "").replace("%", "%%")
    flag = flag or "--" + name.replace("_", "-")
    kind = (f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))).split("|")[0].strip()
    if kind == "bool":
        on = default is True
        parser.add_argument(flag, dest=name, action="store_false" if on else "store_true", default=default,
                            help=f"turn off (on by default): {doc}" if on else doc)
        return
    shown = "" if default is None else f" (default: {default})"
    parser.add_argument(flag, dest=name, type=_TYPES.get(kind, str), default=default, choices=choices,
                        metavar=metavar, help=doc + shown)


def config_from(args: argparse.Namespace, cls: type, **extra):
    """``cls`` built from the parsed flags named like its fields (and ``extra``); its __post_init__ validates."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**values | extra)


# the parser ------------------------------------------------------------------------------------
def _common(top: bool, model: bool) -> argparse.ArgumentParser:
    """--data-dir, --db, --adapter-store, --s3-endpoint and --model. Sub-commands use SUPPRESS so a flag given before
    the command is kept; the contract lets every command take --model, but it is shown only where it matters (serve,
    train)."""
    from assistant.model import ModelConfig
    from storage.config import StoreConfig
    from storage.objects import AdapterStoreConfig
    from storage.paths import default_data_dir

    c = argparse.ArgumentParser(add_help=False)
    keep = None if top else argparse.SUPPRESS
    c.add_argument("--data-dir", type=Path, default=keep,
                   help=f"where all state lives (env ATTUNE_DATA_DIR; default {default_data_dir()})")
    c.add_argument("--db", metavar="URL", default=StoreConfig.db if top else argparse.SUPPRESS,
                   help=field_docs(StoreConfig)["db"])
    for name in ("adapter_store", "s3_endpoint"):
        c.add_argument("--" + name.replace("_", "-"), metavar="URL",
                       default=getattr(AdapterStoreConfig, name) if top else argparse.SUPPRESS,
                       help=field_docs(AdapterStoreConfig)[name])
    c.add_argument("--model", default=ModelConfig.model if top else argparse.SUPPRESS,
                   help=field_docs(ModelConfig)["model"] + " (default: embedded, SmolLM2-135M-Instruct)"
                   if model else argparse.SUPPRESS)
    return c


def _model_flags(parser: argparse.ArgumentParser) -> None:
    from assistant import model

    config_flag(parser, model.ModelConfig, "quant", choices=model.QUANTS)
    config_flag(parser, model.ModelConfig, "device", choices=model.DEVICES)
    config_flag(parser, model.ModelConfig, "dtype", choices=model.DTYPES)
    config_flag(parser, model.ModelConfig, "threads", metavar="N")


def _serve_parser(sub, common) -> None:
    from assistant.api.protocol import APIConfig
    from assistant.chat.service import ChatConfig
    from assistant.engines.base import GenerationSettings
    from assistant.engines.llamacpp.backend import WEIGHTS, LlamaCppConfig
    from assistant.engines.select import ENGINES
    from assistant.engines.vllm.backend import VLLMConfig
    from assistant.server import ServerConfig
    from personalize.scheduler import WORKERS, SchedulerConfig

    s = sub.add_parser("serve", parents=[common], help="start the UI and the API (the default command)",
                       description="Start the UI at / and the OpenAI-compatible API at /v1.")
    config_flag(s, ServerConfig, "host")
    config_flag(s, ServerConfig, "port")
    _model_flags(s)
    config_flag(s, ChatConfig, "context_tokens")
    config_flag(s, GenerationSettings, "max_new_tokens")
    config_flag(s, GenerationSettings, "temperature")
    config_flag(s, ServerConfig, "allow_signup")
    config_flag(s, ServerConfig, "personalizer", flag="--no-personalizer")
    s.add_argument("--no-memory", action="store_true", help="do not retrieve or record personal memories")
    s.add_argument("--train-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainConfig field for background jobs, e.g. --train-set epochs=2")
    config_flag(s, SchedulerConfig, "min_new_events", flag="--train-after", metavar="N")
    config_flag(s, SchedulerConfig, "min_interval_minutes", flag="--train-interval", metavar="MINUTES")
    config_flag(s, SchedulerConfig, "poll_seconds", flag="--train-poll-seconds", metavar="SECONDS")
    config_flag(s, SchedulerConfig, "workers", choices=WORKERS)
    s.add_argument("--engine", default="auto", choices=ENGINES,
                   help="who generates: auto (llama.cpp on a CPU when installed and the model is GGUF, else "
                        "transformers), llamacpp, transformers, or a vLLM server (make vllm; README)")
    config_flag(s, LlamaCppConfig, "weights", flag="--llamacpp-weights", choices=WEIGHTS)
    config_flag(s, VLLMConfig, "url", flag="--vllm-url", metavar="URL")
    config_flag(s, APIConfig, "max_body_bytes", flag="--api-max-body-bytes", metavar="BYTES")
    config_flag(s, APIConfig, "max_messages", flag="--api-max-messages", metavar="N")
    config_flag(s, APIConfig, "max_tokens", flag="--api-max-tokens", metavar="N")


def _worker_parser(sub, common) -> None:
    from assistant import model
    from personalize.worker import WorkerConfig

    w = sub.add_parser(
        "worker", parents=[common], help="run queued training jobs until stopped (serve --workers external)",
        description="Claim queued training jobs from the database and run each in its own process, one at a time, "
                    "until SIGTERM or Ctrl+C. With --db postgresql://... any number of workers on any number of "
                    "machines share the queue (each job is claimed once, FOR UPDATE SKIP LOCKED) and wake as soon as "
                    "a job is queued (LISTEN/NOTIFY); on SQLite a worker on the same machine polls. A worker holds "
                    "a lease on its job, renewed while the job runs: if the worker dies, the job is failed when the "
                    "lease runs out and the user's next job can run. Start servers with --workers external so they "
                    "only queue jobs. Without --adapter-store, workers and servers must share the data "
                    "dir (the same --data-dir path, e.g. a network mount).")
    config_flag(w, WorkerConfig, "device", metavar="auto|cpu|cuda|cuda:N")
    config_flag(w, model.ModelConfig, "quant", choices=model.QUANTS)
    config_flag(w, model.ModelConfig, "dtype", choices=model.DTYPES)
    config_flag(w, model.ModelConfig, "threads", metavar="N")
    w.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainConfig field for the jobs (personalize/config.py), e.g. --set epochs=2")
    config_flag(w, WorkerConfig, "lease_seconds", metavar="SECONDS")
    config_flag(w, WorkerConfig, "poll_seconds", metavar="SECONDS")
    config_flag(w, WorkerConfig, "name")
    config_flag(w, WorkerConfig, "job_module", metavar="MODULE")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and the sub-parsers whose own errors ``parse_args`` reports (users, memory)."""
    common, quiet = _common(False, True), _common(False, False)
    p = argparse.ArgumentParser(
        prog="launch.py", parents=[_common(True, True)], description="Attune: a local-first assistant that learns you.",
        epilog="With no command, Attune serves: `launch.py --port 8000` is `launch.py serve --port 8000`. "
               "`launch.py COMMAND --help` lists a command's flags.")
    p.add_argument("--version", action="version", version=f"attune {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub, common)
    u = sub.add_parser("users", parents=[quiet], help="manage users: add NAME, key NAME, list")
    us = u.add_subparsers(dest="action", metavar="ACTION")
    us.add_parser("add", parents=[quiet], help="create a user (password from stdin or a prompt)").add_argument("name")
    us.add_parser("key", parents=[quiet], help="print a new API key for a user (shown once)").add_argument("name")
    us.add_parser("list", parents=[quiet], help="list users")
    i = sub.add_parser("import", parents=[quiet], help="add conversation history from a JSONL file")
    i.add_argument("name")
    i.add_argument("file", type=Path)
    t = sub.add_parser("train", parents=[common], help="run one training job for a user now (foreground)")
    t.add_argument("name")
    _model_flags(t)
    t.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a TrainConfig field (personalize/config.py), e.g. --set epochs=2")
    a = sub.add_parser("adapters", parents=[quiet], help="list a user's adapter versions; roll back")
    a.add_argument("name")
    a.add_argument("--rollback", metavar="VERSION", help="serve this version again ('base' for none)")
    m = sub.add_parser("memory", parents=[quiet], help="personal memory maintenance: rebuild NAME")
    ms = m.add_subparsers(dest="action", metavar="ACTION")
    ms.add_parser("rebuild", parents=[quiet], help="rebuild a user's FAISS index from SQLite").add_argument("name")
    sub.add_parser("export", parents=[quiet], help="print all of a user's data as JSON").add_argument("name")
    f = sub.add_parser("forget", parents=[quiet], help="delete all of a user's data")
    f.add_argument("name")
    f.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sub.add_parser("backup", parents=[quiet], help="back up the data dir (safe while serving) into a new folder"
                   ).add_argument("dir", type=Path)
    sub.add_parser("restore", parents=[quiet], help="restore a backup into an empty data dir").add_argument(
        "dir", type=Path)
    _worker_parser(sub, common)
    return p, {"users": u, "memory": m}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("attune")
    except PackageNotFoundError:
        return "(not installed: run `make setup`)"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from storage.paths import default_data_dir

    parser, needs_action = build_parser()
    if not any(a in COMMANDS for a in argv) and not any(a in ("-h", "--help", "--version") for a in argv):
        argv = ["serve", *argv]  # `python launch.py [flags]` serves
    args = parser.parse_args(argv)
    if args.command in needs_action and not args.action:
        actions = {"users": "add NAME, key NAME or list", "memory": "rebuild NAME"}[args.command]
        needs_action[args.command].error(f"say what to do: {args.command} {actions}")
    args.data_dir = args.data_dir or default_data_dir()
    args.db = args.db or ""
    args.adapter_store, args.s3_endpoint = args.adapter_store or "", args.s3_endpoint or ""
    return args


# running a command ------------------------------------------------------------------------------
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


def memory_service(store):
    from assistant.memory.service import MemoryConfig, MemoryService

    return MemoryService(store, MemoryConfig())


def serve(store, args: argparse.Namespace) -> None:
    from assistant.api.protocol import APIConfig
    from assistant.chat.service import ChatConfig
    from assistant.engines.base import GenerationSettings
    from assistant.engines.llamacpp.backend import LlamaCppConfig
    from assistant.engines.vllm.backend import VLLMConfig
    from assistant.memory.service import MemoryConfig
    from assistant.model import ModelConfig
    from assistant.server import ServerConfig, serve
    from personalize.scheduler import SchedulerConfig, start_background

    if args.url and args.engine != "vllm":
        raise ValueError("--vllm-url: only used with --engine vllm")
    model_cfg, schedule_cfg = config_from(args, ModelConfig), config_from(args, SchedulerConfig)
    train_cfg = train_config(args.train_set)  # a bad --train-set fails here, before the model loads
    serve(store, model_cfg, config_from(args, ChatConfig, defaults=config_from(args, GenerationSettings)),
          config_from(args, ServerConfig), None if args.no_memory else MemoryConfig(),
          start_personalizer=lambda: _personalizer_log() or start_background(store, model_cfg, train_cfg, schedule_cfg),
          vllm_cfg=config_from(args, VLLMConfig) if args.engine == "vllm" else None, engine=args.engine,
          llamacpp_cfg=config_from(args, LlamaCppConfig), api_cfg=config_from(args, APIConfig))


def _personalizer_log() -> None:
    """serve prints what its personalizer does (jobs started or queued; whether this process runs the scheduler, which
    with several servers on one database moves to another when its holder stops) on stderr."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("attune: %(message)s"))
    logger = logging.getLogger("attune.personalize")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False


def train(store, args: argparse.Namespace) -> None:
    from assistant.model import ModelConfig
    from personalize import api

    def progress(step, total, loss):
        print(f"attune: step {step}/{total} loss {loss:.4f}" if loss is not None else
              f"attune: step {step}/{total}", file=sys.stderr, flush=True)

    print(json.dumps(api.train_now(store, args.name, config_from(args, ModelConfig), train_config(args.set),
                                   on_progress=progress)))


def worker(store, args: argparse.Namespace) -> None:
    import logging

    from assistant.model import ModelConfig
    from personalize.worker import WorkerConfig, run_worker

    config = config_from(args, WorkerConfig)
    model_cfg = config_from(args, ModelConfig, device=config.model_device)
    train_cfg = train_config(args.set)  # a bad --set fails here, before any job is claimed
    logging.basicConfig(level=logging.INFO, format="attune worker: %(message)s")
    run_worker(store, config, model_cfg, train_cfg)


def adapters(store, args: argparse.Namespace) -> None:
    from personalize import api
    from storage.errors import CLI

    user = store.users.by_name(args.name)
    if args.rollback:
        print(json.dumps(api.rollback(store, user.id, args.rollback)))
        return
    versions = api.list_versions(store, user.id)
    if versions:
        print(json.dumps(versions, indent=1))
    else:
        print(f"{user.name} has no adapter versions yet. One appears when a training job passes the gate: the "
              f"server trains in the background once {user.name} has chatted and rated enough answers, or run "
              f"one now with: {CLI} train {user.name}")


def users(store, args: argparse.Namespace) -> None:
    if args.action == "add":
        user = store.users.create(args.name, read_password(args.name))
        print(f"Created user {user.name} (id {user.id}).")
    elif args.action == "key":
        print(store.users.new_api_key(store.users.by_name(args.name).id))
        print("Store this key now: only its hash is kept. Use it as the OpenAI API key with base_url .../v1.",
              file=sys.stderr)
    else:
        for user in store.users.list():
            print(f"{user.id}\t{user.name}\t{user.created_at}")


def forget(store, args: argparse.Namespace) -> int:
    from assistant.chat.account import forget_user

    user = store.users.by_name(args.name)
    if not args.yes and (not sys.stdin.isatty() or input(f"Delete ALL data of {user.name}? [y/N] ") != "y"):
        print("Nothing deleted (pass --yes to skip the question).")
        return 1
    forget_user(store, user.id, memory_service(store))
    print(f"Forgot {user.name}: conversations, feedback, memories and adapters deleted.")
    return 0


def run(args: argparse.Namespace) -> int:
    from storage import Store
    from storage.config import StoreConfig
    from storage.objects import AdapterStoreConfig
    from storage.transfer import export_user

    db = config_from(args, StoreConfig)
    if args.command == "restore":  # before anything creates a database in the (empty) data dir
        from storage.backup import restore
        from storage.paths import DataDir

        print(json.dumps(restore(args.dir, DataDir(Path(args.data_dir)), db)))
        return 0
    store = Store(args.data_dir, db, config_from(args, AdapterStoreConfig))
    if args.command == "serve":
        serve(store, args)
    elif args.command == "users":
        users(store, args)
    elif args.command == "import":
        from assistant.chat.account import import_user_history

        counts = import_user_history(store, store.users.by_name(args.name).id, args.file, memory_service(store))
        print(json.dumps({"user": args.name, **counts}))
    elif args.command == "train":
        train(store, args)
    elif args.command == "adapters":
        adapters(store, args)
    elif args.command == "memory":
        print(json.dumps(memory_service(store).rebuild(store.users.by_name(args.name).id)))
    elif args.command == "export":
        print(json.dumps(export_user(store, store.users.by_name(args.name).id), ensure_ascii=False, indent=1))
    elif args.command == "forget":
        return forget(store, args)
    elif args.command == "worker":
        worker(store, args)
    elif args.command == "backup":
        from storage.backup import backup

        manifest = backup(store, args.dir)
        print(json.dumps({"backup": str(args.dir), "files": len(manifest["files"]),
                          "bytes": sum(f["bytes"] for f in manifest["files"].values())}))
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from storage.errors import AttuneError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (AttuneError, ValueError) as e:  # ValueError: a config's __post_init__ names the bad field
        print(f"attune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl+C before serving began (the server itself exits 0 on SIGINT/SIGTERM)
        print("attune: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`launch.py export NAME | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when exiting
        return 1


if __name__ == "__main__":
    sys.exit(main())
