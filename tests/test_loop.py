"""The whole loop as a user runs it, on the tiny model: import a history, `launch.py train` while the
server runs, the next API turn is served by the new adapter version, the "My assistant" tab shows it
with its metrics, rollback and Retrain now work from the browser."""

from __future__ import annotations

import json

import httpx
import pytest

from helpers import Server, cli, db_rows, open_page, sign_in, wait_for

pytestmark = pytest.mark.slow
TINY_TRAIN = ["rank=4", "alpha=8", "lr=0.003", "epochs=2", "max_steps=12", "max_seq_len=128", "anchor_count=6",
              "anchor_max_new_tokens=6", "anchor_margin=100.0", "mixed_precision=\"no\""]
FACTS = [("What is my dog's name?", "Your dog is called Biscuit."), ("Where do I live?", "You live in Lyon."),
         ("What is my job?", "You are a night-shift nurse."), ("Which tea do I like?", "Jasmine tea."),
         ("Who is my sister?", "Your sister is Clara."), ("What do I play?", "You play the cello.")] * 2


@pytest.fixture(scope="module")
def loop(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("loop") / "data"
    assert cli("users", "add", "alice", data_dir=data, stdin="correct horse\n").returncode == 0
    key = cli("users", "key", "alice", data_dir=data).stdout.strip()
    history = data.parent / "history.jsonl"
    history.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": a}]})
                                 for q, a in FACTS))
    r = cli("import", "alice", str(history), data_dir=data)
    assert r.returncode == 0, r.stderr
    extra = [a for s in TINY_TRAIN for a in ("--train-set", s)]
    with Server(data, "--model", str(tiny_model_dir), "--quant", "none", "--max-new-tokens", "8",
                "--temperature", "0", *extra) as srv:
        srv.data, srv.key, srv.model = data, key, str(tiny_model_dir)
        yield srv


def chat(srv) -> dict:
    r = httpx.post(srv.base + "/v1/chat/completions", headers={"Authorization": f"Bearer {srv.key}"}, timeout=60,
                   json={"messages": [{"role": "user", "content": "What is my dog's name?"}]})
    assert r.status_code == 200, r.text
    return r.json()


def test_background_job_publishes_and_the_next_turn_uses_it(loop, browser):
    from playwright.sync_api import expect

    # Alice's imported history is enough new signal: the scheduler trains her adapter on its own,
    # in a separate process, and the server uses the new version on her next turn without a restart.
    job = wait_for(lambda: [j for j in db_rows(loop, "SELECT * FROM jobs WHERE trigger = 'scheduler'")
                            if j["status"] not in ("queued", "running")], timeout=300, what="the scheduled job")[0]
    assert job["status"] == "published", job["error"] or job["result"]
    served = chat(loop)
    assert served["system_fingerprint"] == "attune-adapter-v1" and served["attune"]["adapter_version"] == 1
    assert db_rows(loop, "SELECT adapter_version FROM messages WHERE id = ?",
                   [served["attune"]["message_id"]])[0]["adapter_version"] == 1
    metrics = json.loads(db_rows(loop, "SELECT metrics FROM adapter_versions WHERE version = 1")[0]["metrics"])
    assert metrics["heldout_loss"] < metrics["heldout_loss_before"]

    # The "My assistant" tab shows the version (its numbers under Details); switch to the base model there.
    page = open_page(browser, loop)
    sign_in(page, "alice", "correct horse")
    page.get_by_role("tab", name="My assistant").click()
    expect(page.locator("#personal-status")).to_contain_text("your personal version 1", timeout=15_000)
    expect(page.locator("#personal-versions")).to_contain_text("Version 1 — in use")
    page.locator("#personal-details").get_by_text("Details").click()
    expect(page.locator("#version-details")).to_contain_text(f"{metrics['heldout_loss']:.4f}")
    page.locator("#rollback-version input").click()
    page.get_by_role("option", name="the base model (no personal version)").click()
    page.locator("#rollback-btn").click()
    expect(page.locator("#personal-msg")).to_contain_text("Now the base model answers you", timeout=10_000)
    assert chat(loop)["system_fingerprint"] == "attune-base"

    # Training a new version starts a job in its own process; the tab follows it to the end.
    page.locator("#retrain-btn").click()
    expect(page.locator("#personal-msg")).to_contain_text("Training started", timeout=10_000)
    ui_job = wait_for(lambda: db_rows(loop, "SELECT * FROM jobs WHERE trigger = 'ui'"), what="the UI job")[0]
    done = wait_for(lambda: [j for j in db_rows(loop, "SELECT * FROM jobs WHERE id = ?", [ui_job["id"]])
                             if j["status"] in ("published", "rejected", "failed")], timeout=300, what="job end")[0]
    assert done["status"] in ("published", "rejected"), done["error"]
    expect(page.locator("#personal-job-details")).to_contain_text(f"#{ui_job['id']}", timeout=15_000)
    page.context.close()


def test_cli_train_prints_the_result_and_adapters_lists_it(loop):
    assert cli("users", "add", "bob", data_dir=loop.data, stdin="battery staple\n").returncode == 0
    history = loop.data.parent / "bob.jsonl"  # 6 answers: under the scheduler's threshold of 8
    secret = ("What is my locker code?", "Your locker code is Zanzibar-7781.")
    history.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": a}]})
                                 for q, a in [*FACTS[:5], secret]))
    assert cli("import", "bob", str(history), data_dir=loop.data).returncode == 0
    r = cli("train", "bob", "--model", loop.model, "--quant", "none", *[a for s in TINY_TRAIN for a in ("--set", s)],
            data_dir=loop.data, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(result) == {"published", "version", "reason", "metrics", "job_id"}
    assert result["published"] and result["version"] == 1, result["reason"]
    assert result["metrics"]["heldout_loss"] < result["metrics"]["heldout_loss_before"]
    assert "step" in r.stderr  # progress was shown
    listed = json.loads(cli("adapters", "bob", data_dir=loop.data).stdout)
    assert listed[0]["version"] == 1 and listed[0]["active"]
    rolled = json.loads(cli("adapters", "bob", "--rollback", "base", data_dir=loop.data).stdout)
    assert rolled["active_version"] is None
    bad = cli("adapters", "bob", "--rollback", "7", data_dir=loop.data)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert cli("train", "bob", "--set", "epochs=-1", data_dir=loop.data).stderr.count("epochs") >= 1

    # Forget bob while the server runs: rows, vectors, adapters and replay entries are gone from every file.
    assert (loop.data / "adapters" / "u2" / "v1").is_dir()
    assert cli("forget", "bob", "--yes", data_dir=loop.data).returncode == 0
    assert not (loop.data / "adapters" / "u2").exists()
    leftovers = [p for p in loop.data.rglob("*") if p.is_file() and b"Zanzibar-7781" in p.read_bytes()]
    assert leftovers == []
    assert db_rows(loop, "SELECT COUNT(*) AS n FROM replay_examples WHERE user_id = 2")[0]["n"] == 0
