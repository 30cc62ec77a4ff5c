"""Phase 5, evaluation: config and items (:mod:`.config`), every model's answers with a cache
(:mod:`.answers`), metrics (:mod:`.metrics`), the optional LLM judge (:mod:`.judge`), statistics
(:mod:`.stats`), the report (:mod:`.report`) and the run (:mod:`.run`)."""
