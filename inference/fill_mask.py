"""Encoder-only (BERT) runs: fill each [MASK] of a prompt with the most likely token."""
import jax.numpy as jnp
import numpy as np

from input_pipeline.tokenizer import MASK_ID, Tokenizer

MASK_TEXT = '[MASK]'


def encode_with_masks(tokenizer: Tokenizer, text: str) -> list[int]:
  """Token ids of `text` with the literal '[MASK]' turned into the mask id (ordinary
  encoding never produces control ids, so the parts are encoded separately)."""
  ids = []
  for i, part in enumerate(text.split(MASK_TEXT)):
    if i:
      ids.append(MASK_ID)
    ids.extend(tokenizer.encode(part))
  return ids


def fill_masks(objective, params, tokenizer: Tokenizer, prompts: list[str], max_len: int) -> list[str]:
  """Each prompt with its [MASK]s replaced by the model's top prediction."""
  results = []
  for prompt in prompts:
    ids = encode_with_masks(tokenizer, prompt)
    if MASK_ID not in ids:
      raise ValueError(f'Prompt {prompt!r} has no {MASK_TEXT}; an encoder-only run fills '
                       f'{MASK_TEXT} tokens.')
    if len(ids) > max_len:
      raise ValueError(f"Prompt is {len(ids)} tokens but the model's context is {max_len}; "
                       'shorten it.')
    ids_1T = jnp.asarray([ids], jnp.int32)
    batch = {'inputs': ids_1T, 'segment_ids': jnp.ones_like(ids_1T),
             'positions': jnp.arange(len(ids))[None],
             'token_type_ids': jnp.zeros_like(ids_1T)}
    logits_TV = objective.logits(params, batch)[0]
    logits_TV = logits_TV.at[:, :tokenizer.vocab_size].get()  # no padding rows of the embedding
    best_T = np.asarray(jnp.argmax(logits_TV, axis=-1))
    filled = [int(best_T[t]) if token == MASK_ID else token for t, token in enumerate(ids)]
    results.append(tokenizer.decode(filled))
  return results
