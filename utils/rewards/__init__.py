"""Rewards: pure rule-based functions (:mod:`.rules`) over the ECG lexicon (:mod:`.lexicon`), the trained
reward model's scorer (:mod:`.reward_model`), the registry and weighted mix that GRPO trains on and
evaluation reports (:mod:`.mix`), hard negatives for reward-model pairs (:mod:`.negatives`), and the
score / audit / terms tooling (:mod:`.audit`)."""
