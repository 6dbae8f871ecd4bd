"""What the "My assistant" tab says, in the user's words and language: what a version learned (from how many
answers, corrections and facts; the style the user taught), why it was kept or not used, what training is
doing now and how the last one ended. :func:`reason_text` words the same verdicts with their numbers, for
the Details accordion. Pure functions of the rows ``storage`` returns (a version's ``metrics``, a job's
``progress`` and ``result``); ``personalize`` records them (reasons in English, verdicts as codes)."""

from __future__ import annotations

from assistant.ui.i18n import tr

PHASES = {"loading model": "phase_load", "answering anchor prompts": "phase_general",
          "scoring the current version": "phase_measure", "training": "phase_train", "evaluating": "phase_check",
          "publishing": "phase_publish", "recording the rejection": "phase_record"}
"""personalize's job phases (its words, in ``progress.phase``) and how the tab names them."""


def date(stamp: str | None) -> str:
    """``2025-01-05 14:03`` from a stored ISO time (UTC)."""
    return (stamp or "")[:16].replace("T", " ")


def join(lang: str, items: list[str]) -> str:
    """``a, b and c`` (``a、b和c``)."""
    if len(items) < 2:
        return "".join(items)
    return tr(lang, "list_sep").join(items[:-1]) + tr(lang, "list_and") + items[-1]


def _count(lang: str, key: str, n: int) -> str:
    return tr(lang, f"{key}_1") if n == 1 else tr(lang, key, n=n)


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def learned_text(lang: str, metrics: dict) -> str:
    """``Learned from 12 of your answers, 2 corrections and 1 thing you told it about yourself.``; "" when the
    version recorded no counts. Answers are the user's own (facts turned into questions are not counted twice);
    a correction is one that replaced an answer the user had not liked (a preference pair)."""
    ex = metrics.get("examples") or {}
    if not isinstance(ex, dict):
        return ""
    corrections = _int(ex.get("train_pair")) + _int(ex.get("heldout_pair"))
    answers = sum(_int(ex.get(f"{s}_sft")) - _int(ex.get(f"{s}_fact")) for s in ("train", "heldout")) - corrections
    parts = [_count(lang, key, n) for key, n in (("n_answers", answers), ("n_corrections", corrections),
                                                 ("n_facts", _int(ex.get("facts")))) if n > 0]
    return tr(lang, "learned_from", what=join(lang, parts)) if parts else ""


def style_text(lang: str, style) -> str:
    """``Your style: opens with “Ahoy!”, short answers (about 20 words) and bullet lists.``; "" when nothing was
    taught. Keys personalize may record: ``head``, ``tail`` (text), ``max_words`` (0: none), ``bullets``,
    ``language`` ("zh": Chinese answers)."""
    if not isinstance(style, dict):
        return ""
    items = [tr(lang, f"style_{k}", text=str(style[k]).strip()) for k in ("head", "tail")
             if isinstance(style.get(k), str) and style[k].strip()]
    if _int(style.get("max_words")) > 0:
        items.append(tr(lang, "style_short", n=style["max_words"]))
    if style.get("bullets") is True:
        items.append(tr(lang, "style_bullets"))
    if style.get("language") == "zh":
        items.append(tr(lang, "style_chinese"))
    return tr(lang, "your_style", items=join(lang, items)) if items else ""


def baseline_name(lang: str, parent: int | None) -> str:
    return tr(lang, "baseline_version", v=parent) if parent else tr(lang, "baseline_base")


def verdict_code(m: dict) -> str:
    """What a gate verdict said, from its numbers (versions recorded before verdicts carried a code)."""
    if m.get("code"):
        return m["code"]
    if m.get("passed"):
        return "published"
    margin = (m.get("config") or {}).get("anchor_margin")
    rise = m.get("anchor_rise")
    return "general_worse" if rise is not None and margin is not None and rise > margin else "not_improved"


def verdict_text(lang: str, m: dict, parent: int | None) -> str:
    """Why a version was kept or not used, without numbers but the one a user can read (``31% closer``)."""
    baseline = baseline_name(lang, parent)
    code = verdict_code(m)
    if code == "general_worse":
        return tr(lang, "why_worse_general", baseline=baseline)
    if code != "published":
        return tr(lang, "why_not_better", baseline=baseline)
    before, after, rise = m.get("heldout_loss_before"), m.get("heldout_loss"), m.get("anchor_rise")
    closer = ""
    if isinstance(before, int | float) and isinstance(after, int | float) and before > 0 and after < before:
        closer = tr(lang, "closer", pct=max(1, round(100 * (before - after) / before)))
    general = "general_unchecked" if rise is None else "general_same" if rise <= 0 else "general_about"
    return tr(lang, "why_kept", baseline=baseline, closer=closer, general=tr(lang, general))


def version_text(lang: str, v: dict) -> str:
    """One version in the default view: its state, then what it learned and why it was kept or not used."""
    m = v.get("metrics") or {}
    m = {**m, **(m.get("gate") or {})}
    heads = {"published": "v_kept", "rejected": "v_not_used", "damaged": "v_damaged"}
    head = "v_in_use" if v.get("active") else heads.get(v.get("status"), "v_deleted")
    parts = [tr(lang, head, v=v["version"], date=date(v.get("created_at")))]
    parent = v.get("parent_version") or m.get("continued_from")
    if v.get("status") == "rejected":
        parts.append(verdict_text(lang, m, parent))
    elif v.get("status") == "published":
        parts += [learned_text(lang, m), verdict_text(lang, m, parent) if "passed" in m else "",
                  style_text(lang, m.get("style"))]
    return tr(lang, "sentence_sep").join(p for p in parts if p)


def job_text(lang: str, job: dict) -> str:
    """What training is doing now, or how the last training ended (its version is explained in the list)."""
    state, p = job["status"], job.get("progress") or {}
    if state == "queued":
        return tr(lang, "training_queued")
    if state == "running":
        what = [tr(lang, PHASES[p["phase"]])] if p.get("phase") in PHASES else []
        if p.get("total"):
            what.append(tr(lang, "training_step", step=p.get("step", 0), total=p["total"]))
        return tr(lang, "training_now", what=tr(lang, "list_sep").join(what) or tr(lang, "phase_load"))
    result = job.get("result") or {}
    code = result.get("code") or ("failed" if state == "failed" or job.get("error") else "")
    if code == "published" and result.get("version"):
        outcome = tr(lang, "outcome_kept", v=result["version"])
    elif code in ("not_improved", "general_worse") and result.get("candidate_version"):
        outcome = tr(lang, "outcome_not_used", v=result["candidate_version"])
    elif code in ("not_improved", "general_worse"):
        why = verdict_text(lang, {**(result.get("metrics") or {}), "code": code}, None)
        outcome = tr(lang, "outcome_not_used_why", why=why)
    elif code in ("not_enough", "nothing_new", "failed"):
        outcome = tr(lang, f"outcome_{code}")
    else:
        return ""
    return tr(lang, "last_training", date=date(job.get("finished_at") or job.get("created_at")), outcome=outcome)


def _f(value) -> str:
    return "—" if value is None else f"{value:.4f}"


def reason_text(lang: str, result: dict, error: str | None = None, parent: int | None = None) -> str:
    """Why a job or version ended as it did, with its numbers, in ``lang`` (for Details; personalize records
    its reasons in English)."""
    m = result.get("metrics") or {}
    code = result.get("code") or ("failed" if error else verdict_code(m) if "passed" in m else "")
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


def details_job_text(lang: str, job: dict) -> str:
    """The latest job with its step, loss and reason, for Details."""
    p = job.get("progress") or {}
    line = tr(lang, "details_job", id=job["id"], state=tr(lang, f"job_{job['status']}"))
    if job["status"] == "running":
        line += f" ({p['phase']})" if p.get("phase") else ""
        line += " · " + tr(lang, "job_step", step=p.get("step", 0), total=p.get("total", "?"))
        if p.get("loss") is not None:
            line += " · " + tr(lang, "job_loss", loss=f"{p['loss']:.4f}")
    return f"{line} {reason_text(lang, job.get('result') or {}, job.get('error'))}".strip()
