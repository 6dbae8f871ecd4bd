"""UI strings in English and Simplified Chinese. Static labels go through Gradio's i18n (the browser's
language picks); messages built on the server go through ``tr`` in the language of the request's
``Accept-Language``; ``tr_error`` translates the errors a web user can cause."""

from __future__ import annotations

import re

from assistant.ui.i18n_personal import EN_PERSONAL, ZH_PERSONAL

EN = {
    # sign-in page
    "title": "# Attune",
    "tagline": "A local assistant that learns you. Sign in, or create an account.",
    "first_run_html": "No accounts exist yet: choose a user name and a password (8+ characters) and press "
                      "Create account.",
    "username": "User name",
    "password": "Password",
    "sign_in": "Sign in",
    "create_account": "Create account",
    "sign_out": "Sign out",
    "signup_closed": "Sign-up is closed here; ask the person who runs Attune for an account.",
    "too_many_attempts": "Too many failed sign-ins for this account or from this address. Try again in {minutes} "
                         "min (each further attempt until then makes the wait longer).",
    "cross_site": "This form must be sent from Attune's own page; reload it and try again.",
    "form_too_large": "What was sent is too long for a sign-in form; type your name and password and try again.",
    "session_ended": "You are signed out (the session ended). Reload the page and sign in again.",
    # chat
    "tab_chat": "Chat",
    "conversations": "Conversations",
    "no_conversations": "No conversations yet.",
    "new_chat": "New conversation",
    "delete_chat": "Delete",
    "delete_confirm": "Delete “{title}”? This cannot be undone.",
    "delete_yes": "Yes, delete it",
    "cancel": "Cancel",
    "rename": "Rename",
    "rename_label": "New title",
    "renamed": "Conversation renamed.",
    "message": "Message",
    "placeholder": "Ask anything… (Enter to send, Shift+Enter for a new line)",
    "send": "Send",
    "stop": "Stop",
    "continue": "Continue the answer",
    "assistant": "Attune",
    "settings": "Generation settings",
    "temperature": "Temperature (0 = deterministic)",
    "max_new_tokens": "Max answer tokens",
    "top_p": "Top-p",
    "hint": "👍/👎 rate an answer · ✏️ edit an answer into the right one (saved as a correction), or edit your "
            "question to ask it again · 🔄 answer again (earlier answers stay listed under ℹ️).",
    "use_adapter": "Use my personal adapter",
    "use_memory": "Use my memories",
    "busy": "An answer is still being written: wait for it, or press Stop.",
    "truncated": "Your message is longer than the model's context: its middle was left out for the model "
                 "(the whole message is saved).",
    "dropped": "Older turns of this conversation were left out to fit the model's context.",
    "adapter_damaged": "Your personal version {v} is damaged on disk, so version {now} answered and answers from "
                       "now on. Train a new version to replace it.",
    "adapter_damaged_base": "Your personal version {v} is damaged on disk, so the base model answered and answers "
                            "until a new version is trained.",
    "adapter_unavailable": "Your personal version {v} could not be downloaded from the adapter store, so version {now} "
                           "answered this time; it is tried again on your next message.",
    "adapter_unavailable_base": "Your personal version {v} could not be downloaded from the adapter store, so the base "
                                "model answered this time; it is tried again on your next message.",
    "memory_unavailable": "Your memories could not be searched for this answer; it was answered without them.",
    "question_edited": "Question edited: answering it again (the earlier version stays in your history).",
    "correction_saved": "Correction saved: Attune will learn from it.",
    "deleted": "Conversation deleted.",
    "nothing_to_delete": "Nothing to delete: this conversation is not saved yet.",
    "no_longer_shown": "That message is no longer shown; pick the conversation again.",
    "nothing_to_continue": "Only an answer cut at the token limit can be continued.",
    "nothing_to_retry": "There is nothing to answer again in this conversation yet.",
    "pick_conversation": "Pick a conversation first.",
    # per-answer details
    "info_base": "base model",
    "info_adapter": "your adapter v{v}",
    "info_memories": "{n} memories used",
    "info_memory_one": "1 memory used",
    "info_no_memories": "no memories used",
    "info_stopped": "stopped",
    "info_length": "cut at the token limit",
    "info_error": "failed",
    "info_tokens": "{n} tokens",
    "info_memory_gone": "(a memory you deleted since)",
    "info_earlier": "Earlier answers ({n})",
    "info_memories_title": "Memories used",
    # compare
    "tab_compare": "Compare",
    "compare_intro": "Ask one question; see the base model and your personalized assistant answer side by side.",
    "question": "Question",
    "compare": "Compare",
    "base_answer": "Base model",
    "personal_answer": "Your personal version (+ your memories)",
    # memory
    "tab_memory": "Memory",
    "memory_intro": "What Attune remembers: short facts you told it about yourself, your corrections and answers "
                    "you liked (never disliked or unrated answers). Only relevant ones are used, and only ever for "
                    "you. Edit or delete any of them; a deleted one never comes back.",
    "edit_memory": "New text for this memory",
    "save_edit": "Save edit",
    "mem_col_id": "id",
    "mem_col_kind": "kind",
    "mem_col_text": "fact",
    "mem_col_source": "source",
    "mem_col_date": "date",
    "mem_kind_statement": "you said",
    "mem_kind_correction": "your correction",
    "mem_kind_liked": "answer you liked",
    "mem_kind_fact": "added by you",
    "mem_kind_turn": "old turn",
    "mem_answer_text": "to “{question}”: {text}",
    "mem_replaced": "replaced by {id}",
    "mem_source_none": "Memory tab",
    "search": "Search",
    "memory_id": "Memory id",
    "delete_memory": "Delete memory",
    "remember_fact": "Tell Attune something to remember",
    "remember": "Remember",
    "forget_sure": "Yes, delete all my memories",
    "forget_all": "Forget everything",
    "memory_off": "Memory is off on this server.",
    "memory_enter_id": "Enter the id of the memory to delete (first column).",
    "memory_deleted": "Memory {id} deleted: it will not be used again.",
    "memory_enter_id_edit": "Click a memory in the table (or enter its id), then write its new text.",
    "memory_edited": "Memory {id} replaced by your new text; the old text will not be used again.",
    "remembered": "Remembered.",
    "already_remembered": "Already remembered.",
    "forget_confirm": "Tick the box to confirm: this deletes every memory.",
    "forgot": "Forgot {n} memories.",
    # my assistant: assistant.i18n_personal
    # account
    "tab_account": "Account",
    "key_intro": "Use Attune from any OpenAI client with this base URL and an API key from here. A key is shown "
                 "once; only its hash is kept.",
    "base_url": "Base URL",
    "key_name": "Name for a new key (e.g. laptop)",
    "new_key": "Create API key",
    "api_key": "New API key (copy it now: it is shown only once)",
    "keys": "Your API keys",
    "col_key_name": "name",
    "col_key_id": "key id",
    "col_key_created": "created",
    "no_keys": "No API keys yet.",
    "key_to_revoke": "Key to revoke",
    "revoke_key": "Revoke key",
    "key_revoked": "Key {id} revoked: it stops working now.",
    "pick_key": "Pick a key to revoke first.",
    "change_password": "Change password",
    "current_password": "Current password",
    "new_password": "New password",
    "repeat_password": "New password again",
    "passwords_differ": "The two new passwords differ; type the same one twice.",
    "password_changed": "Password changed. Your other sessions were signed out.",
    "your_data": "Your data",
    "export": "Download all my data (JSON)",
    "delete_account_intro": "Delete your account and everything Attune holds about you: conversations, feedback, "
                            "memories, adapters and keys. This cannot be undone.",
    "delete_sure": "Yes, delete my account and all my data",
    "delete_account": "Delete my account",
    "delete_need_confirm": "Tick the box and enter your password to delete your account.",
    # errors a web user can cause
    "err_wrong_password": "Wrong user name or password.",
    "err_password_short": "Passwords need at least {n} characters.",
    "err_password_long": "Passwords are at most 1024 characters, without NUL bytes.",
    "err_bad_name": "User names are 1-32 characters: letters, digits, '_', '.', '-', starting with a letter or "
                    "digit.",
    "err_name_taken": "The user name {name} is taken; sign in instead or choose another name.",
    "err_empty": "The {what} is empty; type something first.",
    "err_settings": "A generation setting is out of range; reset the sliders under Generation settings.",
    "err_not_found": "That item no longer exists (or is not yours); reload the page.",
    "err_no_key": "No working key with that id; pick one from the list.",
    "err_key_name": "Key names are at most 60 characters.",
    "err_too_long": "The {what} is too long ({n} characters; the limit is {limit}). Split it into parts.",
    "err_generation": "Generation failed: {detail}. Try again, or shorten the conversation.",
    # issue 16: the chat UI people share a computer with (answer versions, memory picking)
    "answer_versions": "Answers to your last message (pick one to read it)",
    "memory_click_hint": "Click a memory in the table to edit or delete it.",
    "memory_picked": "**Memory {id}** · {kind} · {source} · {date}",
    "memory_delete_confirm": "Delete memory {id} for good? Attune will never use it again:\n\n> {text}",
    "memory_delete_yes": "Yes, delete this memory",
    "memory_pick_first": "Click a memory in the table first.",
}

ZH = {
    "title": "# Attune",
    "tagline": "一个会了解你的本地助手。请登录或创建账户。",
    "first_run_html": "还没有任何账户：请选择用户名和密码（至少 8 个字符），然后点击“创建账户”。",
    "username": "用户名",
    "password": "密码",
    "sign_in": "登录",
    "create_account": "创建账户",
    "sign_out": "退出登录",
    "signup_closed": "此处不开放注册；请向运行 Attune 的人申请账户。",
    "too_many_attempts": "此账户或此地址的登录失败次数过多。请在 {minutes} 分钟后再试"
                         "（在此之前每次尝试都会延长等待时间）。",
    "cross_site": "此表单必须从 Attune 自己的页面提交；请刷新页面后重试。",
    "form_too_large": "提交的内容对登录表单来说太长了；请输入用户名和密码后重试。",
    "session_ended": "你已退出登录（会话已结束）。请刷新页面并重新登录。",
    "tab_chat": "聊天",
    "conversations": "对话",
    "no_conversations": "还没有对话。",
    "new_chat": "新对话",
    "delete_chat": "删除",
    "delete_confirm": "删除“{title}”？此操作无法撤销。",
    "delete_yes": "确定删除",
    "cancel": "取消",
    "rename": "重命名",
    "rename_label": "新标题",
    "renamed": "对话已重命名。",
    "message": "消息",
    "placeholder": "随便问…（回车发送，Shift+回车换行）",
    "send": "发送",
    "stop": "停止",
    "continue": "继续回答",
    "assistant": "Attune",
    "settings": "生成设置",
    "temperature": "温度（0 = 确定性）",
    "max_new_tokens": "最大回答长度（词元）",
    "top_p": "核采样（Top-p）",
    "hint": "👍/👎 评价回答 · ✏️ 把回答改成正确的（保存为更正），或编辑你的问题重新提问 · "
            "🔄 重新回答（之前的回答列在 ℹ️ 下）。",
    "use_adapter": "使用我的个人适配器",
    "use_memory": "使用我的记忆",
    "busy": "回答还在生成中：请稍候，或点击“停止”。",
    "truncated": "你的消息超出了模型的上下文长度：中间部分未提供给模型（完整消息已保存）。",
    "dropped": "为适应模型的上下文长度，本对话较早的内容未提供给模型。",
    "adapter_damaged": "你的个人版本 {v} 在磁盘上已损坏，因此由版本 {now} 回答，之后也由它回答。"
                       "请训练一个新版本来替换它。",
    "adapter_damaged_base": "你的个人版本 {v} 在磁盘上已损坏，因此由基础模型回答，直到训练出新版本。",
    "adapter_unavailable": "你的个人版本 {v} 暂时无法从适配器存储下载，因此这次由版本 {now} 回答；下一条消息时会再试。",
    "adapter_unavailable_base": "你的个人版本 {v} 暂时无法从适配器存储下载，因此这次由基础模型回答；"
                                "下一条消息时会再试。",
    "memory_unavailable": "这次回答时无法检索你的记忆，因此回答未使用记忆。",
    "question_edited": "问题已修改：正在重新回答（之前的版本保留在你的历史记录中）。",
    "correction_saved": "更正已保存：Attune 会从中学习。",
    "deleted": "对话已删除。",
    "nothing_to_delete": "无可删除内容：此对话尚未保存。",
    "no_longer_shown": "该消息已不再显示；请重新选择对话。",
    "nothing_to_continue": "只有因长度上限被截断的回答才能继续。",
    "nothing_to_retry": "此对话中还没有可以重新回答的内容。",
    "pick_conversation": "请先选择一个对话。",
    "info_base": "基础模型",
    "info_adapter": "你的适配器 v{v}",
    "info_memories": "使用了 {n} 条记忆",
    "info_memory_one": "使用了 1 条记忆",
    "info_no_memories": "未使用记忆",
    "info_stopped": "已停止",
    "info_length": "因长度上限被截断",
    "info_error": "失败",
    "info_tokens": "{n} 个词元",
    "info_memory_gone": "（一条之后被你删除的记忆）",
    "info_earlier": "之前的回答（{n}）",
    "info_memories_title": "使用的记忆",
    "tab_compare": "对比",
    "compare_intro": "提一个问题，并排查看基础模型和你的个性化助手的回答。",
    "question": "问题",
    "compare": "对比",
    "base_answer": "基础模型",
    "personal_answer": "你的个人版本（+ 你的记忆）",
    "tab_memory": "记忆",
    "memory_intro": "Attune 记住的内容：你讲过的关于自己的简短事实、你的更正和你点赞的回答"
                    "（从不包括点踩或未评价的回答）。只使用相关的记忆，且只用于你。你可以编辑或删除任何一条；删除后不会再出现。",
    "edit_memory": "这条记忆的新内容",
    "save_edit": "保存修改",
    "mem_col_id": "编号",
    "mem_col_kind": "类型",
    "mem_col_text": "事实",
    "mem_col_source": "来源",
    "mem_col_date": "日期",
    "mem_kind_statement": "你说过",
    "mem_kind_correction": "你的更正",
    "mem_kind_liked": "你点赞的回答",
    "mem_kind_fact": "你添加的",
    "mem_kind_turn": "旧的对话记录",
    "mem_answer_text": "针对“{question}”：{text}",
    "mem_replaced": "已被 {id} 取代",
    "mem_source_none": "记忆页",
    "search": "搜索",
    "memory_id": "记忆编号",
    "delete_memory": "删除记忆",
    "remember_fact": "告诉 Attune 需要记住的事",
    "remember": "记住",
    "forget_sure": "是的，删除我所有的记忆",
    "forget_all": "全部忘记",
    "memory_off": "此服务器未开启记忆功能。",
    "memory_enter_id": "请输入要删除的记忆编号（第一列）。",
    "memory_deleted": "记忆 {id} 已删除：它不会再被使用。",
    "memory_enter_id_edit": "点击表格中的一条记忆（或输入其编号），然后写下新的内容。",
    "memory_edited": "记忆 {id} 已替换为新内容；旧内容不会再被使用。",
    "remembered": "已记住。",
    "already_remembered": "已经记住了。",
    "forget_confirm": "请勾选确认框：这会删除所有记忆。",
    "forgot": "已忘记 {n} 条记忆。",
    "tab_account": "账户",
    "key_intro": "可用任何 OpenAI 客户端访问 Attune：使用下面的基础 URL 和在此创建的 API 密钥。"
                 "密钥只显示一次，仅保存其哈希。",
    "base_url": "基础 URL",
    "key_name": "新密钥的名称（例如：笔记本）",
    "new_key": "创建 API 密钥",
    "api_key": "新的 API 密钥（请立即复制：只显示这一次）",
    "keys": "你的 API 密钥",
    "col_key_name": "名称",
    "col_key_id": "密钥编号",
    "col_key_created": "创建时间",
    "no_keys": "还没有 API 密钥。",
    "key_to_revoke": "要撤销的密钥",
    "revoke_key": "撤销密钥",
    "key_revoked": "密钥 {id} 已撤销：立即失效。",
    "pick_key": "请先选择要撤销的密钥。",
    "change_password": "修改密码",
    "current_password": "当前密码",
    "new_password": "新密码",
    "repeat_password": "再次输入新密码",
    "passwords_differ": "两次输入的新密码不一致；请输入相同的密码。",
    "password_changed": "密码已修改。你的其他会话已退出登录。",
    "your_data": "你的数据",
    "export": "下载我的全部数据（JSON）",
    "delete_account_intro": "删除你的账户以及 Attune 保存的关于你的一切：对话、反馈、记忆、适配器和密钥。"
                            "此操作无法撤销。",
    "delete_sure": "是的，删除我的账户和全部数据",
    "delete_account": "删除我的账户",
    "delete_need_confirm": "请勾选确认框并输入密码以删除账户。",
    "err_wrong_password": "用户名或密码错误。",
    "err_password_short": "密码至少需要 {n} 个字符。",
    "err_password_long": "密码最多 1024 个字符，且不能包含 NUL 字节。",
    "err_bad_name": "用户名为 1-32 个字符：字母、数字、“_”、“.”、“-”，并以字母或数字开头。",
    "err_name_taken": "用户名 {name} 已被使用；请直接登录或换一个名字。",
    "err_empty": "{what}为空；请先输入内容。",
    "err_settings": "生成设置超出范围；请在“生成设置”中重新调整滑块。",
    "err_not_found": "该项目已不存在（或不属于你）；请刷新页面。",
    "err_no_key": "没有该编号的有效密钥；请从列表中选择。",
    "err_key_name": "密钥名称最多 60 个字符。",
    "err_too_long": "{what}太长（{n} 个字符；上限为 {limit}）。请拆分成几部分。",
    "err_generation": "生成失败：{detail}。请重试，或缩短对话。",
    # issue 16: the chat UI people share a computer with (answer versions, memory picking)
    "answer_versions": "对你上一条消息的各个回答（选择一个查看）",
    "memory_click_hint": "点击表格中的一条记忆即可修改或删除它。",
    "memory_picked": "**记忆 {id}** · {kind} · {source} · {date}",
    "memory_delete_confirm": "永久删除记忆 {id}？Attune 将不再使用它：\n\n> {text}",
    "memory_delete_yes": "是的，删除这条记忆",
    "memory_pick_first": "请先点击表格中的一条记忆。",
}

EN.update(EN_PERSONAL)
ZH.update(ZH_PERSONAL)
WHAT_ZH = {"message": "消息", "correction": "更正", "content": "内容", "title": "标题", "fact": "事实"}

assert EN.keys() == ZH.keys(), "every UI string needs both languages"
LANGS = {"en": EN, "zh-CN": ZH}

# English error messages from storage/engine -> (key, named groups used as format arguments)
_ERRORS = [
    (re.compile(r"^Wrong user name or password"), "err_wrong_password"),
    (re.compile(r"^Passwords need at least (?P<n>\d+)"), "err_password_short"),
    (re.compile(r"^Passwords are at most"), "err_password_long"),
    (re.compile(r"^User names are 1-32"), "err_bad_name"),
    (re.compile(r"^The user name (?P<name>.+) is taken"), "err_name_taken"),
    (re.compile(r"^The (?P<what>\w+) is empty; type something first"), "err_empty"),
    (re.compile(r"^The (?P<what>\w+) is (?P<n>[\d,]+) characters; the limit is (?P<limit>[\d,]+)"), "err_too_long"),
    (re.compile(r"^Invalid generation setting"), "err_settings"),
    (re.compile(r"does not exist \(or is not yours\)|is not a valid id"), "err_not_found"),
    (re.compile(r"^No working key with id"), "err_no_key"),
    (re.compile(r"^Key names are at most"), "err_key_name"),
    (re.compile(r"^Another training job is running"), "trainer_busy"),
]


def lang_of(request) -> str:
    """``zh-CN`` when the request's Accept-Language prefers Chinese, else ``en`` (request may be None)."""
    headers = getattr(request, "headers", None) or {}
    accept = str(headers.get("accept-language") or "")
    first = accept.split(",")[0].split(";")[0].strip().lower()
    return "zh-CN" if first.startswith("zh") else "en"


def tr(lang: str, key: str, **values) -> str:
    """The string ``key`` in ``lang`` (English when unknown), formatted with ``values``."""
    text = LANGS.get(lang, EN)[key]
    return text.format(**values) if values else text


def tr_error(lang: str, error: Exception) -> str:
    """A user-facing error in ``lang``; messages without a translation are shown as they are."""
    message = str(error)
    for pattern, key in _ERRORS:
        m = pattern.search(message)
        if m:
            values = m.groupdict()
            if lang == "zh-CN" and "what" in values:
                values["what"] = WHAT_ZH.get(values["what"], values["what"])
            return tr(lang, key, **values)
    return message


def make_i18n():
    import gradio as gr

    return gr.I18n(**{"en": EN, "zh-CN": ZH})
