"""Using a model: a chat session over one image (`session`), boxes drawn on it (`draw`), the `rskd-chat`
command (`chat_cli`) and the web demo (`web`)."""
