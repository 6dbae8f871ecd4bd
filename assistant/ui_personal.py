"""The "My assistant" tab: adapter versions with their gate metrics, live job status and loss
curve, Retrain now, rollback, and the personalization switch. Everything is read for the
signed-in user only, through ``personalize.api``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from storage.errors import AttuneError, InputError

if TYPE_CHECKING:
    from assistant.ui import ChatUI

PRIVATE = {"api_visibility": "private"}
VERSION_COLUMNS = ["version", "status", "active", "created", "held-out loss", "before", "anchor rise", "gate"]


def _f(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def snapshot(ui: ChatUI, user_id: int):
    """(status markdown, versions table, loss curve) for one user."""
    from personalize import api

    st = api.status(ui.store, user_id)
    active = st["active_version"]
    lines = [f"**Personalization:** {'on' if st['personalization'] else 'off'} · **Serving:** "
             f"{f'your adapter v{active}' if active else 'the base model'}"]
    job = st["open_job"] or (st["jobs"][0] if st["jobs"] else None)
    if job:
        p = job.get("progress") or {}
        state = job["status"]
        detail = f"step {p.get('step', 0)}/{p.get('total', '?')}" if state == "running" else ""
        if p.get("phase") and state == "running":
            detail = f"{p['phase']} {detail}"
        if p.get("loss") is not None and state == "running":
            detail += f", loss {p['loss']:.4f}"
        reason = (job.get("result") or {}).get("reason") or job.get("error") or ""
        lines.append(f"**Latest job #{job['id']}** ({job['trigger']}): {state} {detail} {reason}".strip())
    rows = []
    for v in st["versions"]:
        m = v.get("metrics") or {}
        gate = m.get("gate", m)
        rows.append([v["version"], v["status"], "✔" if v["active"] else "", (v["created_at"] or "")[:16],
                     _f(gate.get("heldout_loss")), _f(gate.get("heldout_loss_before")), _f(gate.get("anchor_rise")),
                     v.get("gate_reason") or ""])
    losses = (job or {}).get("losses") or []
    points = [(p["step"], p["loss"]) for p in losses if p.get("loss") is not None]
    curve = pd.DataFrame({"step": pd.Series([s for s, _ in points], dtype="int64"),  # empty until a job logs
                          "loss": pd.Series([v for _, v in points], dtype="float64")})
    return "\n\n".join(lines), pd.DataFrame(rows, columns=VERSION_COLUMNS), curve, st["personalization"]


def personal_tab(ui: ChatUI, session: gr.State) -> None:
    t = ui.i18n
    with gr.Tab(t("tab_personal"), id="personal") as tab:
        gr.Markdown(t("personal_intro"))
        status = gr.Markdown("", elem_id="personal-status")
        switch = gr.Checkbox(True, label=t("personalization"), elem_id="personalization")
        with gr.Row():
            retrain = gr.Button(t("retrain"), variant="primary", elem_id="retrain-btn")
            refresh = gr.Button(t("refresh"), elem_id="personal-refresh")
        versions = gr.Dataframe(headers=VERSION_COLUMNS, interactive=False, wrap=True, elem_id="versions")
        curve = gr.LinePlot(x="step", y="loss", title=t("loss_curve"), elem_id="loss-curve", height=220)
        with gr.Row():
            version = gr.Textbox(label=t("rollback_to"), placeholder="3 or base", elem_id="rollback-version")
            rollback = gr.Button(t("rollback"), elem_id="rollback-btn")
        message = gr.Markdown("", elem_id="personal-msg")
        timer = gr.Timer(3.0, active=False)

    outputs = [status, versions, curve, switch]

    def show(s):
        user = ui._user(s)
        return snapshot(ui, user["id"])

    def act(action):
        def run(s, *args):
            user = ui._user(s)
            try:
                msg = action(user["id"], *args)
            except AttuneError as e:
                msg = f"⚠️ {e}"
            return (*snapshot(ui, user["id"]), msg)
        return run

    def do_retrain(uid):
        if ui.runner is None:
            raise InputError("The personalizer is off on this server (started with --no-personalizer).")
        job_id = ui.runner.start(uid, trigger="ui")
        return f"Training job #{job_id} started; this page follows its progress."

    def do_rollback(uid, target):
        from personalize import api

        if not str(target or "").strip():
            raise InputError("Enter a version number from the table, or 'base'.")
        result = api.rollback(ui.store, uid, str(target).strip())
        v = result["active_version"]
        return f"Now serving {'the base model' if v is None else f'v{v}'} (from your next message)."

    def do_switch(uid, enabled):
        from personalize import api

        api.set_personalization(ui.store, uid, bool(enabled))
        return "Personalization on." if enabled else "Personalization off: the base model answers, without memories."

    tab.select(show, [session], outputs, **PRIVATE).then(lambda: gr.Timer(active=True), None, [timer], **PRIVATE)
    timer.tick(show, [session], outputs, **PRIVATE)
    refresh.click(show, [session], outputs, **PRIVATE)
    retrain.click(act(do_retrain), [session], [*outputs, message], **PRIVATE)
    rollback.click(act(do_rollback), [session, version], [*outputs, message], **PRIVATE)
    switch.input(act(do_switch), [session, switch], [*outputs, message], **PRIVATE)
