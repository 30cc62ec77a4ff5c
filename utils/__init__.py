"""ECG-GRPO's library: the phase scripts at the repository root are thin; the logic lives here.

One package per concern; dependencies point one way (a package imports only those listed before it)::

    core        typed YAML configs, the scripts' entry point, process tuning, model/run folder files
    models      model references, the one loader, batched generation, the tests' tiny Llama
    data        ECG-Expert-QA: raw shapes, cleaning, the leak-free split, JSONL rows, answer formats
    rewards     rule-based rewards, the trained reward model's scorer, the weighted mix, the audit
    training    one run folder and save path; the SFT, reward-model and GRPO trainers on top of it
    evaluation  answers, metrics, judge, statistics, report
    chat        chat sessions and the terminal front end

Importing any of them changes nothing in the process: the scripts call
:func:`utils.core.runtime.configure_process` themselves. docs/ARCHITECTURE.md maps them to the data flow.
"""
