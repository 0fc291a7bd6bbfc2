"""Zero- and few-shot evaluation of any run's checkpoint (`--mode=eval --tasks=...`).

tasks.py    what an evaluation task is (the JSONL schema) and where tasks come from
bible.py    the built-in tasks, made from the embedded Bible's held-out chapters
fewshot.py  demonstrations and prompts that fit the model's context
scoring.py  batched, shape-bucketed log-likelihoods and generation
metrics.py  accuracies, chrF, bits per byte and their standard errors
harness.py  runs tasks on a model and writes the per-example scores
cli.py      the command-line flags
"""
