"""The UI's tabs next to the chat: Memory (``memory``), Personal (``personal``, texts in
``personal_text``), Account (``account``) and Compare (``compare``). Each builder adds its components inside
the current ``gr.Tabs`` and takes the signed-in user from the request, like the chat tab.
"""
