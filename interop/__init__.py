"""Hugging Face checkpoints in and out: `--mode=import` reads GPT-2, BERT, T5 and Llama
checkpoints into a workdir at step 0; `--mode=export` writes a workdir back in the
layout `transformers` loads. hf_config.py maps config.json, families/ hold each
architecture's options and tensor names, weights.py moves the tensors, cli.py runs it."""


class InteropError(ValueError):
  """A checkpoint, workdir or model this cannot convert; the message says what to change."""
