"""The "My assistant" tab: adapter versions with their gate metrics, live job status and loss
curve, Retrain now, rollback, and the personalization switch. Everything is read for the
signed-in user only, through storage (never importing ``personalize``), and says plainly what is and is
not running."""

from __future__ import annotations

from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from assistant.i18n import tr, tr_error
from assistant.ui_render import PRIVATE
from storage.errors import AttuneError, InputError

if TYPE_CHECKING:
    from assistant.ui import ChatUI

VERSION_COLUMNS = ("col_version", "col_status", "col_active", "col_created", "col_heldout", "col_before",
                   "col_anchor", "col_gate")


def _f(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def _job_line(lang: str, job: dict) -> str:
    p = job.get("progress") or {}
    state = job["status"]
    line = tr(lang, "latest_job", id=job["id"], state=tr(lang, f"job_{state}"))
    if state == "running":
        line += f" ({p['phase']})" if p.get("phase") else ""
        line += " · " + tr(lang, "job_step", step=p.get("step", 0), total=p.get("total", "?"))
        if p.get("loss") is not None:
            line += " · " + tr(lang, "job_loss", loss=f"{p['loss']:.4f}")
    return f"{line} {reason_text(lang, job.get('result') or {}, job.get('error'))}".strip()


def _code(m: dict) -> str:
    """What a gate verdict said, from its numbers (versions recorded before verdicts carried a code)."""
    if m.get("code"):
        return m["code"]
    if m.get("passed"):
        return "published"
    margin = (m.get("config") or {}).get("anchor_margin")
    rise = m.get("anchor_rise")
    return "general_worse" if rise is not None and margin is not None and rise > margin else "not_improved"


def reason_text(lang: str, result: dict, error: str | None = None, parent: int | None = None) -> str:
    """Why a job or version ended as it did, in ``lang`` (personalize records its reasons in English)."""
    m = result.get("metrics") or {}
    code = result.get("code") or ("failed" if error else _code(m) if "passed" in m else "")
    if not code:
        return result.get("reason") or error or ""
    if code == "failed":
        return tr(lang, "why_failed", detail=result.get("reason") or error or "?")
    if code in ("not_enough", "nothing_new"):
        return tr(lang, f"why_{code}")
    parent = m.get("continued_from") if parent is None else parent
    baseline = f"v{parent}" if parent else tr(lang, "baseline_base")
    rise = m.get("anchor_rise")
    margin = (m.get("config") or {}).get("anchor_margin")
    return tr(lang, f"why_{code}", before=_f(m.get("heldout_loss_before")), after=_f(m.get("heldout_loss")),
              rise="—" if rise is None else f"{rise:+.4f}", margin="—" if margin is None else f"{margin:.4f}",
              baseline=baseline)


def snapshot(ui: ChatUI, user_id: int, lang: str):
    """(status markdown, versions table, loss curve, switch) for one user, in ``lang``."""
    st = ui.store.adapters.overview(user_id)
    active = st["active_version"]
    lines = [" · ".join([tr(lang, "st_on" if st["personalization"] else "st_off"),
                         tr(lang, "st_serving_adapter", v=active) if active else tr(lang, "st_serving_base")])]
    running = ui.runner is not None
    if not running:
        lines.append("⚠️ " + tr(lang, "personalizer_off"))
    job = st["open_job"] or (st["jobs"][0] if st["jobs"] else None)
    if job:
        lines.append(_job_line(lang, job))
    if not st["versions"]:
        if running and ui.config.train_after:
            have = ui.store.jobs.events_since(user_id, st["jobs"][0]["created_at"] if st["jobs"] else None)
            lines.append("ℹ️ " + tr(lang, "no_versions", need=ui.config.train_after, have=have))
        else:
            lines.append("ℹ️ " + tr(lang, "no_versions_off"))
    rows = []
    for v in st["versions"]:
        m = v.get("metrics") or {}
        gate = m.get("gate", m)
        rows.append([v["version"], v["status"], "✔" if v["active"] else "", (v["created_at"] or "")[:16],
                     _f(gate.get("heldout_loss")), _f(gate.get("heldout_loss_before")), _f(gate.get("anchor_rise")),
                     reason_text(lang, {"metrics": {**m, **gate}}, parent=v.get("parent_version") or 0)
                     if "passed" in gate else v.get("gate_reason") or ""])
    losses = (job or {}).get("losses") or []
    points = [(p["step"], p["loss"]) for p in losses if p.get("loss") is not None]
    curve = pd.DataFrame({"step": pd.Series([s for s, _ in points], dtype="int64"),  # empty until a job logs
                          "loss": pd.Series([v for _, v in points], dtype="float64")})
    table = pd.DataFrame(rows, columns=[tr(lang, c) for c in VERSION_COLUMNS])
    plot = gr.update(value=curve, x_title=tr(lang, "axis_step"), y_title=tr(lang, "axis_loss"))
    return "\n\n".join(lines), table, plot, st["personalization"]


# Over 60 lines on purpose: Gradio builds a tab's components and wires their events in one scope.
def personal_tab(ui: ChatUI) -> None:
    t = ui.i18n
    with gr.Tab(t("tab_personal"), id="personal") as tab:
        gr.Markdown(t("personal_intro"))
        status = gr.Markdown("", elem_id="personal-status")
        switch = gr.Checkbox(True, label=t("personalization"), elem_id="personalization")
        with gr.Row():
            retrain = gr.Button(t("retrain"), variant="primary", elem_id="retrain-btn")
            refresh = gr.Button(t("refresh"), elem_id="personal-refresh")
        versions = gr.Dataframe(headers=[t(c) for c in VERSION_COLUMNS], interactive=False, wrap=True,
                                elem_id="versions")
        curve = gr.LinePlot(x="step", y="loss", title=t("loss_curve"), x_title=t("axis_step"),
                            y_title=t("axis_loss"), elem_id="loss-curve", height=220)
        with gr.Row():
            version = gr.Textbox(label=t("rollback_to"), placeholder=t("rollback_ph"), elem_id="rollback-version")
            rollback = gr.Button(t("rollback"), elem_id="rollback-btn")
        message = gr.Markdown("", elem_id="personal-msg")
        timer = gr.Timer(3.0, active=False)

    outputs = [status, versions, curve, switch]

    def show(request: gr.Request):
        uid, lang = ui.user(request)
        return snapshot(ui, uid, lang)

    def act(action, request, *args):
        uid, lang = ui.user(request)
        try:
            msg = action(uid, lang, *args)
        except AttuneError as e:
            msg = "⚠️ " + tr_error(lang, e)
        return (*snapshot(ui, uid, lang), msg)

    def on_retrain(request: gr.Request):
        return act(do_retrain, request)

    def on_rollback(target, request: gr.Request):
        return act(do_rollback, request, target)

    def on_switch(enabled, request: gr.Request):
        return act(do_switch, request, enabled)

    def do_retrain(uid, lang):
        if ui.runner is None:
            raise InputError(tr(lang, "personalizer_off"))
        return tr(lang, "retrain_started", id=ui.runner.start(uid, trigger="ui"))

    def do_rollback(uid, lang, target):
        if not str(target or "").strip():
            raise InputError(tr(lang, "rollback_enter"))
        v = ui.store.adapters.choose(uid, str(target).strip())["active_version"]
        return tr(lang, "now_serving_base") if v is None else tr(lang, "now_serving", v=v)

    def do_switch(uid, lang, enabled):
        ui.store.users.set_personalization(uid, bool(enabled))
        return tr(lang, "pers_on" if enabled else "pers_off")

    tab.select(show, None, outputs, **PRIVATE).then(lambda: gr.Timer(active=True), None, [timer], **PRIVATE)
    timer.tick(show, None, outputs, **PRIVATE)
    refresh.click(show, None, outputs, **PRIVATE)
    retrain.click(on_retrain, None, [*outputs, message], **PRIVATE)
    rollback.click(on_rollback, [version], [*outputs, message], **PRIVATE)
    switch.input(on_switch, [switch], [*outputs, message], **PRIVATE)
