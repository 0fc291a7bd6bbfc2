"""`python main.py --mode=sample --workdir=DIR --prompt=TEXT`: its flags and what it does.

The run's task decides what a completion is (tasks/): a decoder continues the prompt,
an encoder fills its [MASK]s, an encoder-decoder writes a span for each [MASK].
"""
import dataclasses
import os
import sys

from absl import flags

_PROMPT = flags.DEFINE_string('prompt', None, 'sample: the text to continue.')
_PROMPT_FILE = flags.DEFINE_string('prompt_file', None, 'sample: one prompt per line, batched.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 100, 'sample: tokens to generate.')
_TEMPERATURE = flags.DEFINE_float('temperature', 1.0, 'sample: softmax temperature; 0 is greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'sample: keep the k most likely tokens (0: all).')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'sample: keep the smallest set with this mass.')
_REPETITION_PENALTY = flags.DEFINE_float('repetition_penalty', 1.0,
                                         'sample: >1 discourages repeating seen tokens.')
_STOP = flags.DEFINE_multi_string('stop', [], 'sample: cut each completion at this string.')
_SEED = flags.DEFINE_integer('seed', 0, 'sample: random seed.')
_BEAM_SIZE = flags.DEFINE_integer('beam_size', 0, 'sample: beam search with this many beams '
                                  '(0: sampling / greedy as the other flags say).')
_LENGTH_PENALTY = flags.DEFINE_float('length_penalty', 0.6, 'sample: GNMT length penalty of '
                                     'beam search (0: raw log-probabilities).')
_QUANTIZE = flags.DEFINE_enum('quantize', 'none', ['none', 'int8'],
                              'sample: int8 weight-only quantization (per-channel scales).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16', 'float16'],
                           "sample: compute dtype and weight storage (default: the run's).")
_GREEDY = flags.DEFINE_bool('greedy', False, 'sample: always take the most likely token.')
_DRAFT_WORKDIR = flags.DEFINE_string(
    'draft_workdir', None, 'sample: speculative decoding: a smaller decoder run with the same '
    'tokenizer proposes tokens that this run checks, several per call (greedy output is '
    "plain greedy's up to float rounding on near-ties, sampling keeps this run's "
    'distribution); prompts are decoded one at a time.')
_NUM_DRAFT_TOKENS = flags.DEFINE_integer('num_draft_tokens', 4, 'sample: tokens the draft '
                                         'proposes per round of speculative decoding.')
_MERGE_LORA = flags.DEFINE_bool('merge_lora', True, 'sample: fold a LoRA run\'s adapters into '
                                'its weights (false: run them beside the frozen base).')


def _prompts() -> list[str]:
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      return [line.rstrip('\n') for line in f if line.strip()]
  return [_PROMPT.value or '']


def _request():
  from inference.generate import Request
  from inference.sampling import Sampling
  sampling = Sampling(temperature=0.0 if _GREEDY.value else _TEMPERATURE.value,
                      top_k=_TOP_K.value, top_p=_TOP_P.value,
                      repetition_penalty=_REPETITION_PENALTY.value)
  sampling.check()
  if _DRAFT_WORKDIR.value:
    from inference.speculative import check_request
    check_request(sampling, _NUM_DRAFT_TOKENS.value, _BEAM_SIZE.value)
  return Request(max_new_tokens=_MAX_NEW_TOKENS.value, sampling=sampling, seed=_SEED.value,
                 beam_size=_BEAM_SIZE.value, length_penalty=_LENGTH_PENALTY.value,
                 quantize=_QUANTIZE.value, stop=tuple(_STOP.value))


def _draft_config(config, workdir: str):
  """The draft run's own config, once its tokenizer is known to be this run's."""
  from input_pipeline.tokenizer import EXTRA_IDS_FILE, HF_FILE, SENTENCEPIECE_FILE, tokenizer_file
  from train import run_config
  draft_workdir = _DRAFT_WORKDIR.value
  draft_config = run_config.saved_config(draft_workdir, [])

  def contents(directory, name):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path, 'rb') as f:
        return f.read()
  differs = [name for name in (SENTENCEPIECE_FILE, EXTRA_IDS_FILE, HF_FILE)
             if contents(workdir, name) != contents(draft_workdir, name)]
  if config.model.vocab_size != draft_config.model.vocab_size:
    differs.append(f'model.vocab_size: {draft_config.model.vocab_size}, not '
                   f'{config.model.vocab_size}')
  if differs:
    raise ValueError(
        f"--draft_workdir={draft_workdir} does not share this run's tokenizer (it differs in "
        f"{'; '.join(differs)}); speculative decoding needs the same token ids. Train the draft "
        f'with this tokenizer: copy {tokenizer_file(workdir)} into its new workdir before '
        'training it (a run keeps the tokenizer its workdir holds).')
  return draft_config


def _load(config, workdir: str):
  """(task, params, tokenizer) of a run, computing in --dtype where given."""
  import jax
  from inference.load import load_run
  if _DTYPE.value:
    config.dtype = _DTYPE.value
  task, params, tokenizer = load_run(config, workdir, _MERGE_LORA.value)
  if _DTYPE.value in ('bfloat16', 'float16'):
    params = jax.tree.map(lambda x: x.astype(_DTYPE.value), params)
  return task, params, tokenizer


def sample(config, workdir: str) -> None:
  """Prints each prompt's completion; streams tokens when there is one prompt on a
  terminal and the task continues it (without a draft model)."""
  prompts, request = _prompts(), _request()
  if _DRAFT_WORKDIR.value:  # checked before either run is loaded
    import tasks
    task_class = tasks.task_class(config)
    if not task_class.prompt_is_output:
      raise ValueError(f"--draft_workdir: speculative decoding continues prompts; this run's "
                       f"task '{task_class.name}' does not (drop --draft_workdir).")
    draft_config = _draft_config(config, workdir)
  task, params, tokenizer = _load(config, workdir)
  if _DRAFT_WORKDIR.value:
    from inference.speculative import Draft
    draft_task, draft_params, _ = _load(draft_config, _DRAFT_WORKDIR.value)
    request = dataclasses.replace(request, draft=Draft(draft_task, draft_params,
                                                       _NUM_DRAFT_TOKENS.value))
  stream = (task.streams and len(prompts) == 1 and sys.stdout.isatty() and not request.stop
            and not request.beam_size  # beams are only known at the end
            and request.draft is None)
  if not stream:
    for text in task.complete(params, tokenizer, prompts, request):
      print(text, flush=True)
    return
  # Decoded after the prompt, as `complete` does: alone, a '▁' tokenizer's (Llama's) first
  # new piece would lose its space as the text's dummy prefix.
  streamed = tokenizer.encode(prompts[0])
  shown = len(tokenizer.decode(streamed))

  def on_token(tokens):
    nonlocal shown
    streamed.append(int(tokens[0]))
    text = tokenizer.decode(streamed)
    print(text[shown:], end='', flush=True)
    shown = len(text)

  print(prompts[0], end='', flush=True)
  task.complete(params, tokenizer, prompts, request, on_token=on_token)
  print()
