"""Filling the [MASK]s of a prompt: an encoder-only run (BERT) predicts each masked
token; an encoder-decoder run (T5) writes a span of any length for each [MASK]. The
mask, sentinel and EOS ids are the tokenizer's."""
import jax.numpy as jnp
import numpy as np

from input_pipeline.tokenizer import Tokenizer

MASK_TEXT = '[MASK]'


def encode_with_masks(tokenizer: Tokenizer, text: str, mask_ids=None) -> list[int]:
  """Token ids of `text` with the i-th literal '[MASK]' turned into mask_ids[i] (default:
  the tokenizer's mask id). The parts between are encoded separately, so the literal never
  reaches the tokenizer."""
  ids = []
  for i, part in enumerate(text.split(MASK_TEXT)):
    if i:
      ids.append(tokenizer.mask_id if mask_ids is None else mask_ids[i - 1])
    ids.extend(tokenizer.encode(part))
  return ids


def fill_masks(task, params, tokenizer: Tokenizer, prompts: list[str], max_len: int) -> list[str]:
  """Each prompt with its [MASK]s replaced by the model's top prediction. The prompt is
  framed as training framed a segment (`task.prompt_frame(tokenizer)`: [CLS] ... [SEP] for a
  next-sentence run); the frame is stripped from the text returned."""
  mask_id = tokenizer.mask_id
  if mask_id is None:
    raise ValueError(f'The tokenizer {tokenizer.path} has no mask token, so there is no '
                     f'{MASK_TEXT} to fill; use a run whose tokenizer has one (BERT\'s).')
  prefix, suffix = task.prompt_frame(tokenizer)
  results = []
  for prompt in prompts:
    text_ids = encode_with_masks(tokenizer, prompt)
    if mask_id not in text_ids:
      raise ValueError(f'Prompt {prompt!r} has no {MASK_TEXT}; an encoder-only run fills '
                       f'{MASK_TEXT} tokens.')
    ids = list(prefix) + text_ids + list(suffix)
    if len(ids) > max_len:
      framing = ' with [CLS] and [SEP]' if len(ids) > len(text_ids) else ''
      raise ValueError(f"Prompt is {len(ids)} tokens{framing} but the model's context is "
                       f'{max_len}; shorten it.')
    ids_1T = jnp.asarray([ids], jnp.int32)
    batch = {'inputs': ids_1T, 'segment_ids': jnp.ones_like(ids_1T),
             'positions': jnp.arange(len(ids))[None],
             'token_type_ids': jnp.zeros_like(ids_1T)}
    logits_TV = task.logits(params, batch)[0]
    logits_TV = logits_TV.at[:, :tokenizer.vocab_size].get()  # no padding rows of the embedding
    best_T = np.asarray(jnp.argmax(logits_TV, axis=-1))
    filled = [int(best_T[t]) if token == mask_id else token for t, token in enumerate(ids)]
    results.append(tokenizer.decode(filled[len(prefix):len(ids) - len(suffix)]))
  return results


def span_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
  """The encoder input of a T5 run: each [MASK] becomes the next sentinel, as span
  corruption wrote them in training, then EOS. A prompt without [MASK] gets one at
  its end, so the model continues it."""
  if MASK_TEXT not in text:
    text += MASK_TEXT
  sentinels = tokenizer.sentinel_ids
  if text.count(MASK_TEXT) > len(sentinels):
    raise ValueError(f'The prompt has {text.count(MASK_TEXT)} {MASK_TEXT}s; at most '
                     f'{len(sentinels)} fit the tokenizer\'s sentinels.')
  return encode_with_masks(tokenizer, text, sentinels) + [tokenizer.eos_id]


def fill_spans(tokenizer: Tokenizer, prompt_ids: list[int], target_ids: list[int]) -> str:
  """The prompt's text with each sentinel replaced by the span the decoder wrote after
  that sentinel (target: <extra_id_0> span <extra_id_1> span ... EOS); a sentinel the
  decoder never wrote leaves an empty span."""
  eos, sentinels = tokenizer.eos_id, set(tokenizer.sentinel_ids)
  spans, current = {}, None
  for token in target_ids:
    if token == eos:
      break
    if token in sentinels:
      current = spans.setdefault(token, [])
    elif current is not None:
      current.append(token)
  filled = []
  for token in prompt_ids:
    if token == eos:
      break
    filled.extend(spans.get(token, []) if token in sentinels else [token])
  return tokenizer.decode(filled)
