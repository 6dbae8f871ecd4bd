"""Shared fixtures: a tiny random Llama model + byte-level BPE tokenizer built locally (no network),
a scripted fake backend (tests/fakes.py) for tests where the model is not the point, a Store on
tmp_path, and the real embedded model converted once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "Hello! How can I help you today?", "My dog is called Biscuit and he loves long walks.",
    "The capital of France is Paris.", "I prefer tea over coffee in the morning.",
    "Python is a programming language. SQLite stores data in one file.",
    "Bonjour, ça va ? 你好，世界！ 🎉 emoji and ünïcödé text.", "0123456789 + - * / = ( ) [ ] { }",
] * 20


def build_tiny_model(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def embedded_models_dir(tmp_path_factory) -> Path:
    """``models/`` holding the converted embedded model, converted once per session (~25 s)."""
    from assistant.model import convert_gguf, embedded_gguf
    from storage import DataDir

    dd = DataDir(tmp_path_factory.mktemp("embedded")).ensure()
    convert_gguf(embedded_gguf(), dd)
    return dd.models


def seed_models(data_dir: Path, models_dir: Path) -> None:
    """Give a fresh data dir the already-converted embedded model (what a second start would find)."""
    target = Path(data_dir) / "models"
    target.mkdir(parents=True, exist_ok=True)
    for child in models_dir.iterdir():
        if not (target / child.name).exists():
            shutil.copytree(child, target / child.name)


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_models_dir):
    """A real Attune server (embedded model, greedy, 24-token answers) on a fresh data dir, one per test module
    that asks for it (the browser tests); ``.data`` is its data dir."""
    from helpers import Server

    data = tmp_path_factory.mktemp("ui-server") / "data"
    seed_models(data, embedded_models_dir)
    with Server(data, "--max-new-tokens", "24", "--temperature", "0") as srv:
        srv.data = data
        yield srv


@pytest.fixture
def store(tmp_path):
    from storage import Store

    s = Store(tmp_path / "data")
    yield s
    s.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the whole test session (tests/postgres.py): loopback only, in a temporary folder,
    stopped by PID at the end. Skipped, saying why, where the server binaries are not installed."""
    from postgres import PostgresServer, find_bin

    bin_dir = find_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's server binaries (initdb, pg_ctl) are not installed: `apt-get install postgresql` "
                    "to run the storage tests on PostgreSQL too (.ci/run does)")
    with PostgresServer(bin_dir) as server:
        yield server


@pytest.fixture
def pg_url(postgres_server) -> str:
    """The URL of a new database on the session's PostgreSQL server, with Attune's schema (a copy of one database
    the migrations ran on; ``postgres_server.new_database()`` gives an empty one)."""
    return postgres_server.new_database(migrated=True)


@pytest.fixture(scope="session")
def s3_server():
    """An S3 endpoint for the whole test session (tests/s3server.py: moto_server on a free loopback port), stopped by
    PID at the end; boto3 finds its test credentials in the environment. ``make setup`` installs moto[s3]."""
    from s3server import S3Server, credentials_in_env, find_moto

    moto = find_moto()
    if moto is None:
        pytest.fail("moto_server is not installed: run `make setup` (dev extra: moto[s3], flask, flask-cors).")
    with credentials_in_env(), S3Server(moto) as server:
        yield server


@pytest.fixture
def s3_url(s3_server) -> str:
    """``s3://BUCKET/adapters`` in a new bucket of the session's S3 endpoint (``s3_server.endpoint``)."""
    return s3_server.new_bucket()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    """A Store on SQLite (the default: attune.db in the data dir) and, as a second run of the test, on PostgreSQL.
    A test module runs its storage tests on both with ``store = any_store``-style fixtures."""
    from storage import Store

    db = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    s = Store(tmp_path / "data", db)
    yield s
    s.close()


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir, tmp_path_factory):
    from assistant.model import ModelConfig, load_model
    from storage import DataDir

    # float32: batched greedy decoding is bit-identical to each request alone only in fp32 (in bf16 the
    # activation rounding depends on the batch shape; BENCHMARKS.md), and the batching tests check exactly that.
    return load_model(ModelConfig(model=str(tiny_model_dir), quant="none", device="cpu", dtype="float32"),
                      DataDir(tmp_path_factory.mktemp("tiny-dd")).ensure())


@pytest.fixture
def engine(store, tiny_loaded):
    from assistant.chat.service import ChatConfig, ChatService
    from assistant.engines.base import GenerationSettings
    from assistant.engines.hf.backend import TransformersBackend

    cfg = ChatConfig(context_tokens=512, defaults=GenerationSettings(max_new_tokens=16, temperature=0))
    return ChatService(store, TransformersBackend(tiny_loaded), cfg)


@pytest.fixture
def fake():
    """A scripted chat backend (tests/fakes.py): ``fake.enqueue(["Hello", " world"])``."""
    from fakes import FakeBackend

    return FakeBackend()


@pytest.fixture
def fake_engine(store, fake):
    """ChatService on the scripted backend: for tests about turns, prompts and storage, not the model."""
    from assistant.chat.service import ChatConfig, ChatService
    from assistant.engines.base import GenerationSettings

    cfg = ChatConfig(context_tokens=512, defaults=GenerationSettings(max_new_tokens=16, temperature=0))
    return ChatService(store, fake, cfg)


@pytest.fixture
def alice(store):
    return store.users.create("alice", "correct horse")


@pytest.fixture
def bob(store):
    return store.users.create("bob", "battery staple")


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium driven by Playwright (never a downloaded browser)."""
    from helpers import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is not installed: run `apt-get install chromium` (`make test` does it).")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()
