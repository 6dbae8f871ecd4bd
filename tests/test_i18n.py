"""Every UI string has a Chinese translation, and the UI code passes no untranslated text to a
component: labels, placeholders, titles and messages all go through the i18n tables."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from assistant.ui.i18n import EN, ZH, tr, tr_error
from storage.errors import AuthError, InputError

ROOT = Path(__file__).resolve().parent.parent
UI_MODULES = sorted(p.relative_to(ROOT / "assistant") for p in (ROOT / "assistant" / "ui").rglob("*.py")
                    if not p.name.startswith(("i18n", "__init__")))
TEXT_KWARGS = {"label", "placeholder", "info", "title", "x_title", "y_title", "value"}
ALLOWED_LITERALS = {"", "…", "—", "✔"}
KEEP_IN_LATIN = {"Attune", "API", "URL", "JSON", "OpenAI", "Top-p", "base", "Shift", "Enter", "ID"}


def _sources():
    for name in UI_MODULES:
        yield str(name), (ROOT / "assistant" / name).read_text()


def test_every_key_used_by_the_ui_exists_in_both_languages():
    used = set()
    for _, src in _sources():
        used |= set(re.findall(r'\bt\("(\w+)"\)', src))
        used |= set(re.findall(r'\btr\(\w+, "(\w+)"', src))
        used |= set(re.findall(r'"(col_\w+|job_\w+)"', src))
    missing = sorted(k for k in used if k not in EN or k not in ZH)
    assert not missing, f"UI strings without a translation: {missing}"
    assert len(used) > 80


def test_chinese_strings_are_translated_not_copied():
    for key, en in EN.items():
        words = set(re.findall(r"[A-Za-z][A-Za-z-]{2,}", ZH[key])) - KEEP_IN_LATIN
        assert not words or ZH[key] != en, f"{key!r} is not translated: {ZH[key]!r}"
        assert set(re.findall(r"{(\w+)}", en)) == set(re.findall(r"{(\w+)}", ZH[key])), key


def test_components_get_no_literal_text():
    """A string literal as a component's label/placeholder/... would show untranslated in zh-CN."""
    offenders = []
    for name, src in _sources():
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "gr"):
                continue
            args = [kw.value for kw in node.keywords if kw.arg in TEXT_KWARGS]
            if node.func.attr in ("Button", "Markdown", "Error", "Warning", "Info", "Checkbox") and node.args:
                args.append(node.args[0] if node.func.attr != "Checkbox" else node.keywords and node.args[0])
            for arg in args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value not in ALLOWED_LITERALS:
                    offenders.append(f"{name}:{arg.lineno} gr.{node.func.attr}({arg.value!r})")
    assert not offenders, offenders


def test_errors_a_web_user_can_cause_are_translated():
    assert tr_error("zh-CN", AuthError("Wrong user name or password.")) == ZH["err_wrong_password"]
    assert tr_error("zh-CN", InputError("Passwords need at least 8 characters.")) == "密码至少需要 8 个字符。"
    assert tr_error("zh-CN", InputError("The message is empty; type something first.")) == "消息为空；请先输入内容。"
    assert tr_error("en", InputError("The message is empty; type something first.")).startswith("The message")
    assert tr("zh-CN", "info_adapter", v=3) == "你的适配器 v3"


def test_job_and_gate_reasons_are_worded_in_the_users_language():
    """personalize records its reasons in English; My assistant words them from the verdict's code and numbers."""
    from assistant.ui.tabs.personal import reason_text

    numbers = {"passed": False, "heldout_loss_before": 2.5, "heldout_loss": 2.6, "anchor_rise": 0.12,
               "config": {"anchor_margin": 0.05}, "continued_from": None}
    cases = {
        "published": {"code": "published", "metrics": {**numbers, "passed": True, "heldout_loss": 1.1}},
        "not_improved": {"code": "not_improved", "metrics": numbers},
        "general_worse": {"code": "general_worse", "metrics": numbers},
        "not_enough": {"code": "not_enough", "reason": "Not enough examples yet", "metrics": {}},
        "nothing_new": {"code": "nothing_new", "reason": "Nothing new since v2; keeping it.", "metrics": {}},
        "legacy version row": {"metrics": numbers},  # recorded before verdicts carried a code
    }
    for name, result in cases.items():
        zh, en = reason_text("zh-CN", result), reason_text("en", result)
        assert re.search(r"[\u4e00-\u9fff]", zh) and not set(re.findall(r"[A-Za-z]{3,}", zh)) - KEEP_IN_LATIN, \
            (name, zh)
        assert zh != en and not re.search(r"[\u4e00-\u9fff]", en), (name, en)
    assert "0.0500" in reason_text("en", cases["general_worse"]) and "+0.1200" in reason_text("zh-CN", cases[
        "legacy version row"])
    assert "v3" in reason_text("en", {"code": "not_improved", "metrics": {**numbers, "continued_from": 3}})
    failed = reason_text("zh-CN", {"code": "failed", "reason": "The training loss became nan at step 3"})
    assert failed.startswith("训练任务出错停止") and "nan" in failed
