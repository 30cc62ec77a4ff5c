"""The ground floor, free of torch and of the ECG domain: typed YAML configs with command-line overrides
(:mod:`.config`), the phase scripts' entry point and one-line errors (:mod:`.cli`), explicit process tuning
(:mod:`.runtime`), and the files that make a model or run folder trustworthy (:mod:`.artifacts`)."""
