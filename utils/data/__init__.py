"""ECG-Expert-QA: the eleven raw file shapes read into one record shape and cleaned (:mod:`.raw`), the
pinned download (:mod:`.download`), the leak-free split (:mod:`.split`), the JSONL rows the phases exchange
and their one check (:mod:`.rows`), answer formats (:mod:`.formats`), text helpers (:mod:`.text`), and
Phase 1 itself (:mod:`.prepare`)."""
