"""Models: where a model reference points (:mod:`.resolve`), the one loader every phase uses for tokenizers,
causal LMs and reward classifiers with their adapters, dtype and quantization (:mod:`.loading`), batched
generation (:mod:`.generation`), and the tests' tiny Llama (:mod:`.tiny`). Knows nothing of ECG data."""
