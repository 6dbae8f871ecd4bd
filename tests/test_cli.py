"""launch.py as a user runs it: users, keys, import/export/forget, and clear errors."""

import ast
import json
from pathlib import Path

import pytest

from helpers import cli
from storage.errors import CLI

ROOT = Path(__file__).resolve().parent.parent

HISTORY = {"messages": [{"role": "user", "content": "My dog is called Biscuit."},
                        {"role": "assistant", "content": "Nice name!", "feedback": "like"}]}


def test_users_add_list_key(tmp_path):
    r = cli("users", "add", "alice", data_dir=tmp_path, stdin="correct horse\n")
    assert r.returncode == 0 and "Created user alice" in r.stdout
    assert "alice" in cli("users", "list", data_dir=tmp_path).stdout
    key = cli("users", "key", "alice", data_dir=tmp_path)
    assert key.returncode == 0 and key.stdout.strip().startswith("att-")
    again = cli("users", "add", "alice", data_dir=tmp_path, stdin="correct horse\n")
    assert again.returncode == 2 and "taken" in again.stderr and "Traceback" not in again.stderr


def test_bad_user_name_and_password_are_refused(tmp_path):
    r = cli("users", "add", "../../etc", data_dir=tmp_path, stdin="correct horse\n")
    assert r.returncode == 2 and "User names" in r.stderr
    r = cli("users", "add", "carol", data_dir=tmp_path, stdin="short\n")
    assert r.returncode == 2 and "at least 8" in r.stderr
    assert "carol" not in cli("users", "list", data_dir=tmp_path).stdout


def test_import_export_forget(tmp_path):
    cli("users", "add", "alice", data_dir=tmp_path, stdin="correct horse\n")
    f = tmp_path / "h.jsonl"
    f.write_text(json.dumps(HISTORY) + "\n")
    r = cli("import", "alice", str(f), data_dir=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout) == {"user": "alice", "conversations": 1, "messages": 2,
                                                          "feedback": 1, "memories": 1}
    rebuilt = json.loads(cli("memory", "rebuild", "alice", data_dir=tmp_path).stdout)
    assert rebuilt["memories"] == 1 and (tmp_path / "memory" / "u1.faiss").is_file()
    exported = json.loads(cli("export", "alice", data_dir=tmp_path).stdout)
    assert exported["conversations"][0]["messages"][0]["content"] == "My dog is called Biscuit."
    assert "Biscuit" in exported["memories"][0]["text"] and exported["adapter_versions"] == []
    r = cli("forget", "alice", "--yes", data_dir=tmp_path)
    assert r.returncode == 0
    assert not list((tmp_path / "memory").iterdir())
    blob = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != "h.jsonl")
    assert b"Biscuit" not in blob
    assert cli("export", "alice", data_dir=tmp_path).returncode == 2


def test_import_of_a_malformed_file_says_which_line(tmp_path):
    cli("users", "add", "alice", data_dir=tmp_path, stdin="correct horse\n")
    f = tmp_path / "h.jsonl"
    f.write_text(json.dumps(HISTORY) + "\n{broken\n")
    r = cli("import", "alice", str(f), data_dir=tmp_path)
    assert r.returncode == 2 and "line 2" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(cli("export", "alice", data_dir=tmp_path).stdout)["conversations"] == []


def test_unknown_user(tmp_path):
    r = cli("import", "nobody", str(tmp_path / "x.jsonl"), data_dir=tmp_path)
    assert r.returncode == 2 and "No user named 'nobody'" in r.stderr and "users add" in r.stderr


def test_serve_with_unknown_hub_id_offline_is_one_clear_error(tmp_path):
    r = cli("serve", "--model", "no-such-org/no-such-model", data_dir=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "not in the Hugging Face cache" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_a_bad_port(tmp_path):
    r = cli("serve", "--port", "70000", data_dir=tmp_path)
    assert r.returncode == 2 and "port" in r.stderr


@pytest.mark.parametrize(("flag", "value", "field"), [("--train-after", "0", "min_new_events"),
                                                      ("--train-interval", "-5", "min_interval_minutes"),
                                                      ("--api-max-messages", "0", "max_messages")])
def test_serve_refuses_a_bad_config_value(tmp_path, flag, value, field):
    r = cli("serve", flag, value, data_dir=tmp_path)
    assert r.returncode == 2 and field in r.stderr and "Traceback" not in r.stderr


def test_public_address_without_accounts_refuses_to_start(tmp_path):
    r = cli("serve", "--host", "0.0.0.0", "--port", "0", data_dir=tmp_path, timeout=60)
    assert r.returncode == 2 and "Refusing to listen on 0.0.0.0 with no accounts" in r.stderr
    assert f"({CLI} users add NAME)" in r.stderr  # the command as README writes it


def test_hints_name_the_cli_as_readme_does():
    """Every message that tells a person to run launch.py says it as README.md does (``storage.errors.CLI``)."""
    assert f"{CLI} users add NAME" in (ROOT / "README.md").read_text()
    bare = []
    packages = ("assistant", "personalize", "storage")
    sources = [ROOT / "launch.py", *(p for d in packages for p in ROOT.glob(f"{d}/*.py"))]
    for path in sources:
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(
            n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and n.body and isinstance(
            n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        bare += [f"{path.name}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Constant) and
                 isinstance(n.value, str) and id(n) not in docstrings and "python launch.py" in n.value and
                 ".venv/bin/python launch.py" not in n.value]
    assert not bare, f"hints that say `python launch.py` instead of {CLI!r}: {bare}"


def test_help_version_and_a_missing_action(tmp_path):
    r = cli("--help", data_dir=tmp_path)
    assert r.returncode == 0 and "With no command, Attune serves" in r.stdout
    serve = cli("serve", "--help", data_dir=tmp_path).stdout
    for flag, default in (("--host", "127.0.0.1"), ("--port", "7860"), ("--quant", "auto"), ("--device", "auto"),
                          ("--train-after", "8"), ("--api-max-body-bytes", "4194304"), ("--api-max-messages", "512"),
                          ("--api-max-tokens", "4096")):
        assert flag in serve and f"(default: {default})" in serve
    assert "--model" not in cli("users", "list", "--help", data_dir=tmp_path).stdout  # does nothing there
    assert "--dtype" in cli("train", "--help", data_dir=tmp_path).stdout
    assert cli("--version", data_dir=tmp_path).stdout.startswith("attune ")
    r = cli("users", data_dir=tmp_path)
    assert r.returncode == 2 and "say what to do: users add NAME, key NAME or list" in r.stderr


def test_adapters_without_versions_says_how_one_appears(tmp_path):
    cli("users", "add", "alice", data_dir=tmp_path, stdin="correct horse\n")
    r = cli("adapters", "alice", data_dir=tmp_path)
    assert r.returncode == 0 and "no adapter versions yet" in r.stdout and "train alice" in r.stdout


def test_export_into_a_closed_pipe_is_no_traceback(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    cli("users", "add", "alice", data_dir=tmp_path, stdin="correct horse\n")
    f = tmp_path / "h.jsonl"
    f.write_text((json.dumps(HISTORY) + "\n") * 300)
    cli("import", "alice", str(f), data_dir=tmp_path)
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "export", "alice", "--data-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.read(10)
    proc.stdout.close()  # like `| head -c 10`
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 1 and "Traceback" not in err and "BrokenPipe" not in err


def test_serve_exits_0_after_a_clean_sigterm(tmp_path, tiny_model_dir):
    from helpers import Server

    srv = Server(tmp_path, "--model", str(tiny_model_dir), "--quant", "none", "--no-personalizer", "--no-memory")
    srv.stop()
    log = srv.log_path.read_text()
    assert srv.proc.returncode == 0, log
    assert "Traceback" not in log and "attune: stopped" in log


def test_db_flag_keeps_users_in_postgresql_and_serve_help_names_it(tmp_path, pg_url):
    added = cli("users", "add", "alice", "--db", pg_url, data_dir=tmp_path / "a", stdin="correct horse\n")
    assert added.returncode == 0
    listed = cli("--db", pg_url, "users", "list", data_dir=tmp_path / "b")  # another data dir, the same database
    assert listed.returncode == 0 and "\talice\t" in listed.stdout
    assert not (tmp_path / "a" / "attune.db").exists() and not (tmp_path / "b" / "attune.db").exists()
    serve = " ".join(cli("serve", "--help", data_dir=tmp_path).stdout.split())
    assert "--db URL" in serve and "postgresql://USER@HOST:PORT/NAME" in serve and "attune.db in the data dir" in serve
    bad = cli("users", "list", "--db", "mysql://x@y/z", data_dir=tmp_path)
    assert bad.returncode == 2 and "db: 'mysql://x@y/z' is not a database URL" in bad.stderr
    assert "Traceback" not in bad.stderr
