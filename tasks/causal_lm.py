"""Causal language modelling (GPT): next-token prediction by a decoder-only model over
packed windows of the token stream; it generates by continuing a prompt."""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from inference.generate import Decoding, Request
from input_pipeline.pipeline import Examples, pack_windows
from input_pipeline.tokenizer import Tokenizer
from models.losses import example_batch
from models.transformer import DecoderOnly
from tasks import base

Array = jax.Array


class CausalExamples(Examples):
  """Windows of seq_len + 1 tokens, consecutive ones sharing a token (the last target
  of one is the first input of the next); documents (each ending in `eos_id`, the
  tokenizer's) are packed with segment ids."""

  def __init__(self, seq_len: int, *, eos_id: int):
    super().__init__(seq_len, raw_length=seq_len + 1, window_overlap=1)
    self.eos_id = eos_id

  def make_example(self, item, rng: np.random.Generator):
    return {k: v[0] for k, v in pack_windows(item[None], eos_id=self.eos_id).items()}


def rolling_windows(tokens_N: np.ndarray, length: int, overlap: int, *,
                    eos_id: int) -> dict[str, np.ndarray]:
  """[W, length] rows that score every token of a stream after its first exactly once:
  windows of length + 1 tokens, consecutive ones sharing `overlap` (at least 1), packed as
  training packs them (documents split at `eos_id`). A window after the first weighs 0 on
  its first overlap - 1 targets (scored already; here they are context, so every scored
  token sees at least `overlap` earlier tokens of the window). The last window is padded
  (segment 0, weight 0). With overlap 1 the rows are those CausalExamples makes of a split
  for the eval pass, so a split of 1 + k length tokens scores as `--mode=eval` does."""
  if not 1 <= overlap <= length:
    raise ValueError(f'The rolling overlap {overlap} must be in [1, {length}] (the window).')
  stride, n = length + 1 - overlap, len(tokens_N)
  starts = [0]
  while starts[-1] + length < n - 1:
    starts.append(starts[-1] + stride)
  windows_WL1 = np.zeros((len(starts), length + 1), np.int32)
  for w, start in enumerate(starts):
    piece = tokens_N[start:start + length + 1]
    windows_WL1[w, :len(piece)] = piece
  rows = pack_windows(windows_WL1, eos_id=eos_id)
  index_WL = np.asarray(starts)[:, None] + np.arange(length)[None]  # stream index of input
  real_WL = index_WL < n
  rows['segment_ids'] *= real_WL
  rows['positions'] *= real_WL
  first_scored_W = np.where(np.arange(len(starts)) == 0, 0, overlap - 1)
  scored_WL = (index_WL + 1 < n) & (np.arange(length)[None] >= first_scored_W[:, None])
  rows['weights'] = scored_WL.astype(np.float32)
  return rows


@dataclasses.dataclass(frozen=True)
class CausalLM(base.Task):
  """Next-token prediction with a decoder-only transformer."""
  name = 'causal_lm'
  arch = 'decoder'
  streams = True
  chunks_logits = True
  prompt_is_output = True

  def module(self, train: bool):
    return DecoderOnly(self.cfg, deterministic=not train)

  def model_inputs(self, batch):
    return batch['inputs'], batch['segment_ids'], batch['positions']

  def loss(self, params, batch, dropout_rng, train: bool):
    return self.token_loss(params, batch, dropout_rng, train)

  def example_batch(self, batch_size: int, seq_len: int):
    return example_batch(batch_size, seq_len)

  def examples(self, tokenizer: Tokenizer, seq_len: int) -> CausalExamples:
    return CausalExamples(seq_len, eos_id=tokenizer.eos_id)

  def param_counts(self) -> dict[str, int]:
    cfg = self.cfg
    return {'embedding': cfg.vocab_size * cfg.d_model + base.input_params(cfg),
            'decoder': cfg.num_layers * base.block_params(cfg), 'head': base.head_params(cfg),
            **base.lora_part(cfg, cfg.num_layers)}

  def _text_start(self, tokenizer: Tokenizer, context: list[int]) -> list[int]:
    """Ids before a scored or continued text: bos where the tokenizer starts sequences with
    one (Llama's), else eos before an empty context (its first token is then predicted as a
    document's first, as after the previous document's eos in training)."""
    if tokenizer.adds_bos:
      return [tokenizer.bos_id]
    return [] if context else [tokenizer.eos_id]

  def scoring_rows(self, tokenizer: Tokenizer, context: list[int], continuation: list[int]):
    """One packed row of context + continuation, weighing the continuation's targets."""
    ids = self._text_start(tokenizer, context) + context + continuation
    row = {k: v[0] for k, v in pack_windows(np.asarray([ids]), eos_id=tokenizer.eos_id).items()}
    row['weights'][:len(ids) - 1 - len(continuation)] = 0.0
    return [row]

  def context_room(self, tokenizer: Tokenizer, continuation_length: int, length: int) -> int:
    return length + 1 - continuation_length - int(tokenizer.adds_bos)

  def rolling_rows(self, tokenizer: Tokenizer, text: list[int], length: int, overlap: int):
    """`rolling_windows` over the document as the token stream holds one (ending in eos),
    after an eos (bos for Llama's tokenizer) that predicts its first token."""
    first = tokenizer.bos_id if tokenizer.adds_bos else tokenizer.eos_id
    return self.stream_rows(tokenizer, [first, *text, tokenizer.eos_id], length, overlap)

  def stream_rows(self, tokenizer: Tokenizer, tokens, length: int, overlap: int):
    """`rolling_windows` over a token stream as it is (a split's: documents ending in eos,
    its first token unscored, as the eval pass reads it)."""
    rows = rolling_windows(np.asarray(tokens), length, overlap, eos_id=tokenizer.eos_id)
    return [{k: v[w] for k, v in rows.items()} for w in range(len(rows['inputs']))]

  def generation_prompt(self, tokenizer: Tokenizer, context: list[int]) -> list[int]:
    return self._text_start(tokenizer, context) + context

  def generated_text(self, tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """Decoded after the prompt: alone, a '▁' tokenizer (Llama's) would drop its first
    space as the text's dummy prefix."""
    return tokenizer.decode(prompt + new)[len(tokenizer.decode(prompt)):]

  def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
    for i, prompt in enumerate(prompts):
      if not prompt:
        raise ValueError(f'Prompt {i} is empty; give at least one token of text.')
      if len(prompt) + max_new_tokens > self.cfg.max_len:
        raise ValueError(
            f'Prompt {i} is {len(prompt)} tokens and --max_new_tokens={max_new_tokens}, but the '
            f"model's context is {self.cfg.max_len} tokens; shorten the prompt or lower "
            '--max_new_tokens.')

  def start_decoding(self, params, ids_BP: Array, real_BP: Array) -> Decoding:
    """Prefills the left-padded prompts in one pass; each row's positions count only its
    real tokens and the cache masks the padding."""
    model = DecoderOnly(dataclasses.replace(self.cfg, decode=True))
    positions_BP = jnp.maximum(jnp.cumsum(real_BP, axis=1) - 1, 0)
    ones_B1 = jnp.ones((ids_BP.shape[0], 1), jnp.int32)

    def run(variables, ids_BT, real_BT, positions_BT):
      logits_BTV, variables = model.apply(variables, ids_BT, real_BT, positions_BT,
                                          mutable=['cache'])
      return logits_BTV[:, -1].astype(jnp.float32), variables['cache']

    logits_BV, cache = run({'params': params}, ids_BP, real_BP, positions_BP)
    step = lambda cache, token_B, position_B: run(
        {'params': params, 'cache': cache}, token_B[:, None], ones_B1, position_B[:, None])

    def step_many(cache, ids_BT, positions_BT):  # every position's logits (speculative decoding)
      logits_BTV, variables = model.apply({'params': params, 'cache': cache}, ids_BT,
                                          jnp.ones_like(ids_BT), positions_BT, mutable=['cache'])
      return logits_BTV.astype(jnp.float32), variables['cache']
    return Decoding(logits_BV, cache, positions_BP[:, -1], step, ids_BP.shape[1], step_many)

  def complete(self, params, tokenizer: Tokenizer, prompts: list[str], request: Request,
               on_token: Callable | None = None) -> list[str]:
    """Each prompt followed by its continuation, cut at the first stop string. A prompt
    starts with bos where the tokenizer puts one in front of documents (Llama's). The
    continuation is decoded after its prompt: decoded alone, a '▁' tokenizer (Llama's)
    would drop its first space as the text's dummy prefix."""
    first = [tokenizer.bos_id] if tokenizer.adds_bos else []
    prompt_ids = [first + tokenizer.encode(p) for p in prompts]
    texts = []
    for prompt, before, ids in zip(prompts, prompt_ids, base.continuations(
        self, params, prompt_ids, request, tokenizer.eos_id, on_token)):
      text = tokenizer.decode(before + ids)[len(tokenizer.decode(before)):]
      for stop in request.stop:
        text = text.split(stop)[0]
      texts.append(prompt + text)
    return texts
