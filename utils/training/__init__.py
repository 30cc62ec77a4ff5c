"""Training: the config every trainer shares and its TRL arguments (:mod:`.config`), one run folder, resume
rule and save path (:mod:`.run`), and the three trainers on top of them: SFT (:mod:`.sft`), the reward
model (:mod:`.reward_model`) and GRPO (:mod:`.grpo`). :mod:`.trl_compat` guards the private TRL methods
that GRPO overrides."""
