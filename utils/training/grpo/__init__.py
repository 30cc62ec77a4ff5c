"""Phase 4, GRPO: config and prompts (:mod:`.config`), the policy and its backends (:mod:`.policy`), the
trainer with faster generation (:mod:`.trainer`), held-out reward and sample logs (:mod:`.callbacks`), and
the run (:mod:`.run`)."""
