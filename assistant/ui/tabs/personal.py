"""The "My assistant" tab, in the user's words: whether Attune is learning from their chats and what answers
them now, what training is doing, each version with what it learned and why it was kept or not used
(``assistant.ui.tabs.personal_text``), and only the actions that can run: "Train a new version now" only while
a personalizer runs on this server (else what the person running Attune can do instead), switching only
when there is another version to switch to, and the learning switch. The numbers (losses, the gate's
verdicts, the loss curve) are in a closed Details accordion. Everything is read for the signed-in user
only, through storage (never importing ``personalize``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gradio as gr
import pandas as pd

from assistant.ui.i18n import tr, tr_error
from assistant.ui.render import PRIVATE
from assistant.ui.tabs.personal_text import date, details_job_text, job_text, reason_text, version_text
from storage.errors import AttuneError, InputError

if TYPE_CHECKING:
    from assistant.ui.app import ChatUI

__all__ = ["VERSION_COLUMNS", "View", "personal_tab", "reason_text", "view"]
VERSION_COLUMNS = ("col_version", "col_status", "col_active", "col_created", "col_heldout", "col_before",
                   "col_anchor", "col_gate")
SHOWN_VERSIONS = 10
"""Newest versions listed in words (all of them are in Details)."""


@dataclass
class View:
    """What the tab shows one user, in their language."""

    status: str = ""
    versions: str = ""
    details: str = ""
    rows: list[list] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    learning: bool = True
    can_train: bool = False
    """A personalizer runs, learning is on and no training of theirs is open: "Train a new version now" runs."""
    picks: list[tuple[str, str]] = field(default_factory=list)
    """(label, value) of what the user can switch to: other published versions, and the base model."""


def _f(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def _status(ui: ChatUI, st: dict, user_id: int, lang: str) -> list[str]:
    """Learning on or off (and when the next training comes), what answers now, then what to do about it."""
    on, active, open_job = st["personalization"], st["active_version"], st["open_job"]
    trainer, need = ui.runner is not None, ui.config.train_after
    if not on:
        learning = tr(lang, "st_off")
    elif not trainer:
        learning = tr(lang, "st_on_no_trainer")
    elif open_job or not need:
        learning = tr(lang, "st_on_training")
    else:
        have = ui.store.jobs.events_since(user_id, st["jobs"][0]["created_at"] if st["jobs"] else None)
        learning = tr(lang, "st_on_due" if have >= need else "st_on_auto", need=need, have=have)
    lines = [learning]
    published = any(v["status"] == "published" for v in st["versions"])
    if on:
        lines.append(tr(lang, "st_using_version", v=active) if active else
                     tr(lang, "st_using_base_chosen" if published else "st_using_base_new"))
    job = open_job or (st["jobs"][0] if st["jobs"] else None)
    if job and job_text(lang, job):
        lines.append(job_text(lang, job))
    if not on:
        lines.append("ℹ️ " + tr(lang, "turn_on_to_train"))
    elif not trainer:
        lines.append("ℹ️ " + tr(lang, "how_to_train", name=ui.store.users.by_id(user_id).name))
    if on and not published:
        lines.append("ℹ️ " + tr(lang, "first_version_hint"))
    return lines


def _row(lang: str, v: dict) -> list:
    m = v.get("metrics") or {}
    gate = m.get("gate", m)
    return [v["version"], v["status"], "✔" if v["active"] else "", date(v.get("created_at")),
            _f(gate.get("heldout_loss")), _f(gate.get("heldout_loss_before")), _f(gate.get("anchor_rise")),
            reason_text(lang, {"metrics": {**m, **gate}}, parent=v.get("parent_version") or 0)
            if "passed" in gate else v.get("gate_reason") or ""]


def view(ui: ChatUI, user_id: int, lang: str) -> View:
    """Everything the tab shows ``user_id``, read now."""
    st = ui.store.adapters.overview(user_id)
    on, active, versions = st["personalization"], st["active_version"], st["versions"]
    job = st["open_job"] or (st["jobs"][0] if st["jobs"] else None)
    picks = [(tr(lang, "pick_version", v=v["version"], date=date(v.get("created_at"))), str(v["version"]))
             for v in versions if v["status"] == "published" and not v["active"]]
    if active is not None:
        picks.append((tr(lang, "pick_base"), "base"))
    losses = [(p["step"], p["loss"]) for p in (job or {}).get("losses") or [] if p.get("loss") is not None]
    return View(status="\n\n".join(_status(ui, st, user_id, lang)),
                versions="\n".join(f"- {version_text(lang, v)}" for v in versions[:SHOWN_VERSIONS]),
                details=details_job_text(lang, job) if job else "", rows=[_row(lang, v) for v in versions],
                losses=losses, learning=on, can_train=on and ui.runner is not None and st["open_job"] is None,
                picks=picks if on else [])


def snapshot(ui: ChatUI, user_id: int, lang: str, picked: str | None = None) -> tuple:
    """The tab's outputs for one user: [status, versions, details, table, curve, switch, retrain, pick,
    rollback]; ``picked`` stays selected while it is still something to switch to."""
    v = view(ui, user_id, lang)
    curve = pd.DataFrame({"step": pd.Series([s for s, _ in v.losses], dtype="int64"),  # empty until a job logs
                          "loss": pd.Series([x for _, x in v.losses], dtype="float64")})
    table = pd.DataFrame(v.rows, columns=[tr(lang, c) for c in VERSION_COLUMNS])
    plot = gr.update(value=curve, x_title=tr(lang, "axis_step"), y_title=tr(lang, "axis_loss"))
    keep = picked if picked in {value for _, value in v.picks} else None
    return (v.status, v.versions, v.details, table, plot, v.learning, gr.update(visible=v.can_train),
            gr.update(choices=v.picks, value=keep, visible=bool(v.picks)), gr.update(visible=bool(v.picks)))


# Over 60 lines on purpose: Gradio builds a tab's components and wires their events in one scope.
def personal_tab(ui: ChatUI) -> None:
    t = ui.i18n
    with gr.Tab(t("tab_personal"), id="personal", elem_id="personal-tab") as tab:
        gr.Markdown(t("personal_intro"))
        status = gr.Markdown("", elem_id="personal-status")
        switch = gr.Checkbox(True, label=t("personalization"), elem_id="personalization")
        with gr.Row():
            retrain = gr.Button(t("retrain"), variant="primary", elem_id="retrain-btn", visible=False)
            refresh = gr.Button(t("refresh"), elem_id="personal-refresh")
        versions = gr.Markdown("", elem_id="personal-versions")
        with gr.Row():
            pick = gr.Dropdown(label=t("rollback_to"), choices=[], elem_id="rollback-version", visible=False,
                               scale=3)
            rollback = gr.Button(t("rollback"), elem_id="rollback-btn", visible=False)
        message = gr.Markdown("", elem_id="personal-msg")
        with gr.Accordion(t("details"), open=False, elem_id="personal-details"):
            details = gr.Markdown("", elem_id="personal-job-details")
            table = gr.Dataframe(headers=[t(c) for c in VERSION_COLUMNS], interactive=False, wrap=True,
                                 elem_id="version-details")
            curve = gr.LinePlot(x="step", y="loss", title=t("loss_curve"), x_title=t("axis_step"),
                                y_title=t("axis_loss"), elem_id="loss-curve", height=220)
        timer = gr.Timer(3.0, active=False)

    outputs = [status, versions, details, table, curve, switch, retrain, pick, rollback]

    def show(picked, request: gr.Request):
        uid, lang = ui.user(request)
        return snapshot(ui, uid, lang, picked)

    def act(action, request, picked, *args):
        uid, lang = ui.user(request)
        try:
            msg = action(uid, lang, *args)
        except AttuneError as e:
            msg = "⚠️ " + tr_error(lang, e)
        return (*snapshot(ui, uid, lang, picked), msg)

    def on_retrain(picked, request: gr.Request):
        return act(do_retrain, request, picked)

    def on_rollback(picked, request: gr.Request):
        return act(do_rollback, request, None, picked)

    def on_switch(enabled, picked, request: gr.Request):
        return act(do_switch, request, picked, enabled)

    tab.select(show, [pick], outputs, **PRIVATE).then(lambda: gr.Timer(active=True), None, [timer], **PRIVATE)
    timer.tick(show, [pick], outputs, **PRIVATE)
    refresh.click(show, [pick], outputs, **PRIVATE)
    do_retrain, do_rollback, do_switch = actions(ui)
    retrain.click(on_retrain, [pick], [*outputs, message], **PRIVATE)
    rollback.click(on_rollback, [pick], [*outputs, message], **PRIVATE)
    switch.input(on_switch, [switch, pick], [*outputs, message], **PRIVATE)


def actions(ui: ChatUI) -> tuple:
    """(retrain, rollback, switch): each ``(user_id, lang, *args) -> message``; an AttuneError says why not."""

    def retrain(uid: int, lang: str) -> str:
        if not ui.store.users.by_id(uid).personalization:
            raise InputError(tr(lang, "turn_on_to_train"))
        if ui.runner is None:
            raise InputError(tr(lang, "how_to_train", name=ui.store.users.by_id(uid).name))
        ui.runner.start(uid, trigger="ui")
        return tr(lang, "retrain_started")

    def rollback(uid: int, lang: str, target) -> str:
        if not str(target or "").strip():
            raise InputError(tr(lang, "rollback_pick"))
        v = ui.store.adapters.choose(uid, str(target).strip())["active_version"]
        return tr(lang, "now_serving_base") if v is None else tr(lang, "now_serving", v=v)

    def switch(uid: int, lang: str, enabled) -> str:
        ui.store.users.set_personalization(uid, bool(enabled))
        return tr(lang, "pers_on" if enabled else "pers_off")

    return retrain, rollback, switch
