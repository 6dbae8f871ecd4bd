"""UI strings in English and Simplified Chinese; the browser's language picks (Gradio's i18n)."""

EN = {
    "title": "# Attune",
    "tagline": "A local assistant that learns you. Sign in, or create an account.",
    "first_run": "No accounts exist yet: choose a user name and password and press **Create account**.",
    "username": "User name",
    "password": "Password",
    "sign_in": "Sign in",
    "create_account": "Create account",
    "sign_out": "Sign out",
    "tab_chat": "Chat",
    "conversations": "Conversations",
    "new_chat": "New conversation",
    "delete_chat": "Delete conversation",
    "message": "Message",
    "placeholder": "Ask anything… (Enter to send, Shift+Enter for a new line)",
    "send": "Send",
    "stop": "Stop",
    "assistant": "Attune",
    "settings": "Generation settings",
    "temperature": "Temperature (0 = deterministic)",
    "max_new_tokens": "Max answer tokens",
    "top_p": "Top-p",
    "hint": "👍/👎 rate an answer; ✏️ edit an answer into the right one (saved as a correction); 🔄 retry.",
    "signed_in_as": "Signed in as",
    "need_sign_in": "Please sign in first.",
    "truncated": "Your message is longer than the model's context: its middle was left out for the model "
                 "(the whole message is saved).",
    "dropped": "Older turns of this conversation were left out to fit the model's context.",
    "only_answers": "Only the assistant's answers can be edited (as corrections).",
    "correction_saved": "Correction saved: Attune will learn from it.",
    "deleted": "Conversation deleted.",
    "nothing_to_delete": "Nothing to delete: this conversation is not saved yet.",
}

ZH = {
    "title": "# Attune",
    "tagline": "一个会了解你的本地助手。请登录或创建账户。",
    "first_run": "还没有任何账户：请输入用户名和密码，然后点击 **创建账户**。",
    "username": "用户名",
    "password": "密码",
    "sign_in": "登录",
    "create_account": "创建账户",
    "sign_out": "退出登录",
    "tab_chat": "聊天",
    "conversations": "对话",
    "new_chat": "新对话",
    "delete_chat": "删除对话",
    "message": "消息",
    "placeholder": "随便问…（回车发送，Shift+回车换行）",
    "send": "发送",
    "stop": "停止",
    "assistant": "Attune",
    "settings": "生成设置",
    "temperature": "温度（0 = 确定性）",
    "max_new_tokens": "最大回答长度（token）",
    "top_p": "Top-p",
    "hint": "👍/👎 评价回答；✏️ 把回答改成正确的（保存为更正）；🔄 重试。",
    "signed_in_as": "当前用户",
    "need_sign_in": "请先登录。",
    "truncated": "你的消息超出了模型的上下文长度：中间部分未提供给模型（完整消息已保存）。",
    "dropped": "为适应模型的上下文长度，本对话较早的内容未提供给模型。",
    "only_answers": "只能编辑助手的回答（作为更正）。",
    "correction_saved": "更正已保存：Attune 会从中学习。",
    "deleted": "对话已删除。",
    "nothing_to_delete": "无可删除内容：此对话尚未保存。",
}

assert EN.keys() == ZH.keys(), "every UI string needs both languages"


def make_i18n():
    import gradio as gr

    return gr.I18n(**{"en": EN, "zh-CN": ZH})
