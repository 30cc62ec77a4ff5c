"""Phase 6, chat: a session with any checkpoint (:mod:`.session`) and the terminal front end, interactive
or one-shot (:mod:`.terminal`)."""
