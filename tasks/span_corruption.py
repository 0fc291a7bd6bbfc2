"""Span corruption (T5): the encoder reads text with spans replaced by sentinels; the
decoder writes the sentinels and the spans they replaced. Sampling reads the prompt
with the encoder and writes a span for each [MASK] (or one at the end)."""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from inference.fill_mask import fill_spans, span_prompt
from inference.generate import Decoding, Request
from input_pipeline import spans
from input_pipeline.pipeline import Examples
from input_pipeline.tokenizer import SpecialIds, Tokenizer
from models.losses import example_batch
from models.transformer import EncoderDecoder
from tasks import base

Array = jax.Array


@functools.lru_cache(maxsize=None)
def span_lengths(seq_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
  """(raw tokens, target length) per example: a search, so done once per setting."""
  return spans.raw_length_for(seq_len, noise_density, mean_span_length)


class SpanExamples(Examples):
  """Windows of raw tokens whose corrupted encoder input fits seq_len; the decoder side
  has `targets_length` positions. `special`: the tokenizer's sentinel, EOS and pad ids."""

  def __init__(self, seq_len: int, noise_density: float, mean_span_length: float, *,
               special: SpecialIds):
    raw_length, self.targets_length = span_lengths(seq_len, noise_density, mean_span_length)
    super().__init__(seq_len, raw_length=raw_length)
    self.noise_density, self.mean_span_length = noise_density, mean_span_length
    self.special = special
    if len(special.sentinels) < spans.MAX_SPANS:
      raise ValueError(f'Span corruption needs {spans.MAX_SPANS} sentinel tokens '
                       f'(<extra_id_0>..<extra_id_{spans.MAX_SPANS - 1}>) and this tokenizer has '
                       f"{len(special.sentinels)}; use a tokenizer with them (this project's, "
                       "T5's).")

  def make_example(self, item, rng: np.random.Generator):
    inputs, targets = spans.corrupt_spans(item.astype(np.int32), rng, self.noise_density,
                                          self.mean_span_length, special=self.special)
    pad = lambda x, n: np.pad(x, (0, n - len(x)))
    real = lambda x, n: (np.arange(n) < len(x)).astype(np.int32)
    s, t = self.seq_len, self.targets_length
    decoder_inputs = np.concatenate([[self.special.pad], targets[:-1]])  # T5 starts from pad
    return {'encoder_inputs': pad(inputs, s), 'encoder_segment_ids': real(inputs, s),
            'encoder_positions': np.arange(s, dtype=np.int32) * real(inputs, s),
            'decoder_inputs': pad(decoder_inputs, t).astype(np.int32),
            'decoder_segment_ids': real(targets, t),
            'decoder_positions': np.arange(t, dtype=np.int32) * real(targets, t),
            'targets': pad(targets, t), 'weights': real(targets, t).astype(np.float32)}


_DECODER_KEYS = ('decoder_inputs', 'decoder_segment_ids', 'decoder_positions', 'targets',
                 'weights')


@dataclasses.dataclass(frozen=True)
class SpanCorruption(base.Task):
  """T5's pre-training on corrupted spans."""
  chunks_logits = True
  noise_density: float = 0.15  # share of tokens dropped into spans
  mean_span_length: float = 3.0
  # The decoder's first input when generating: the tokenizer's pad id (T5's convention;
  # 0 in this project's and T5's tokenizers). complete() sets it from the tokenizer.
  decoder_start_id: int = 0

  name = 'span_corruption'
  arch = 'encoder_decoder'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, cfg) -> 'SpanCorruption':
    s = config.span_corruption
    return cls(cfg, config.train.z_loss, noise_density=s.noise_density,
               mean_span_length=s.mean_span_length)

  @classmethod
  def config_problem(cls, config: ml_collections.ConfigDict, selected: bool) -> str | None:
    s = config.span_corruption
    if not 0 < s.noise_density < 1:
      return f'span_corruption.noise_density={s.noise_density} must be in (0, 1).'
    if s.mean_span_length < 1:
      return 'span_corruption.mean_span_length must be at least 1.'
    if selected and config.data.seq_len < 4:  # a kept token, a sentinel, EOS: and a spare
      return (f'data.seq_len={config.data.seq_len} is too short for span corruption; use at '
              'least 4.')
    return None

  def module(self, train: bool):
    return EncoderDecoder(self.cfg, deterministic=not train)

  def model_inputs(self, batch):
    return (batch['encoder_inputs'], batch['encoder_segment_ids'], batch['encoder_positions'],
            batch['decoder_inputs'], batch['decoder_segment_ids'], batch['decoder_positions'])

  def loss(self, params, batch, dropout_rng, train: bool):
    return self.token_loss(params, batch, dropout_rng, train)

  def example_batch(self, batch_size: int, seq_len: int):
    """Both sides `seq_len` long."""
    decoder = example_batch(batch_size, seq_len)
    return {'encoder_inputs': decoder['inputs'], 'encoder_segment_ids': decoder['segment_ids'],
            'encoder_positions': decoder['positions'], 'decoder_inputs': decoder['inputs'],
            'decoder_segment_ids': decoder['segment_ids'],
            'decoder_positions': decoder['positions'], 'targets': decoder['targets'],
            'weights': decoder['weights']}

  def train_batch(self, batch_size: int, seq_len: int):
    """The decoder side is the span targets' length."""
    batch = self.example_batch(batch_size, seq_len)
    t = self.scored_length(seq_len)
    return batch | {k: batch[k][:, :t] for k in _DECODER_KEYS}

  def scored_length(self, seq_len: int) -> int:
    return span_lengths(seq_len, self.noise_density, self.mean_span_length)[1]

  def examples(self, tokenizer: Tokenizer, seq_len: int) -> SpanExamples:
    return SpanExamples(seq_len, self.noise_density, self.mean_span_length,
                        special=tokenizer.special)

  def param_counts(self) -> dict[str, int]:
    cfg = self.cfg
    return {'embedding': cfg.vocab_size * cfg.d_model + 2 * base.input_params(cfg),
            'encoder': (cfg.num_layers * base.block_params(cfg)
                        + cfg.final_norm * base.norm_params(cfg)),
            'decoder': base.decoder_layers(cfg) * base.block_params(cfg, cross=True),
            'head': base.head_params(cfg),
            **base.lora_part(cfg, cfg.num_layers + base.decoder_layers(cfg),
                             cross_blocks=base.decoder_layers(cfg))}

  def matmul_tokens(self, seq_len: int) -> dict[str, int]:
    """The encoder's (and cross-attention keys' and values') over the inputs, the
    decoder's and the output head's over the targets."""
    targets = self.scored_length(seq_len)
    return super().matmul_tokens(seq_len) | {'decoder': targets, 'other': targets}

  def attention_products(self, seq_len: int) -> list[tuple[str, str, int, int, int]]:
    """The encoder's self-attention over the inputs, the decoder's over the targets and
    its cross-attention from the targets to the inputs."""
    targets, decoder = self.scored_length(seq_len), base.decoder_layers(self.cfg)
    return [('encoder', 'self_attention', self.cfg.num_layers, seq_len, seq_len),
            ('decoder', 'self_attention', decoder, targets, targets),
            ('decoder', 'cross_attention', decoder, targets, seq_len)]

  def scoring_pair(self, tokenizer: Tokenizer, context: list[int],
                   continuation: list[int]) -> tuple[list[int], list[int], int]:
    """(encoder ids, decoder targets, index of the first scored target): the continuation
    is the span that the first sentinel, at the end of the context, stands for, and the
    eos that closes a last span's target in training (input_pipeline/spans.py), scored
    with it as T5's rank classification scores a target and its eos (without it a choice
    that is a token prefix of another would always win)."""
    sentinel = tokenizer.sentinel_ids[0]
    closing = self.generation_stop_ids(tokenizer)[0]
    return context + [sentinel, tokenizer.eos_id], [sentinel] + continuation + [closing], 1

  def scoring_rows(self, tokenizer: Tokenizer, context: list[int], continuation: list[int]):
    """One row: the encoder reads the framed context, the decoder is teacher-forced on the
    targets (from the pad token, as T5 starts), weighing the continuation's."""
    source, target, first = self.scoring_pair(tokenizer, context, continuation)
    ids = lambda x: np.asarray(x, np.int32)
    ones = lambda n: np.ones(n, np.int32)
    weights = np.ones(len(target), np.float32)
    weights[:first] = 0.0
    return [{'encoder_inputs': ids(source), 'encoder_segment_ids': ones(len(source)),
             'encoder_positions': ids(range(len(source))),
             'decoder_inputs': ids(([tokenizer.pad_id] + target)[:len(target)]),
             'decoder_segment_ids': ones(len(target)),
             'decoder_positions': ids(range(len(target))), 'targets': ids(target),
             'weights': weights}]

  def context_room(self, tokenizer: Tokenizer, continuation_length: int, length: int) -> int:
    source, target, _ = self.scoring_pair(tokenizer, [], [0] * continuation_length)
    return length - len(source) if len(target) <= length else -1

  def decoding_task(self, tokenizer: Tokenizer) -> 'SpanCorruption':
    return dataclasses.replace(self, decoder_start_id=tokenizer.pad_id)

  def generation_prompt(self, tokenizer: Tokenizer, context: list[int]) -> list[int]:
    return self.scoring_pair(tokenizer, context, [])[0]

  def generated_text(self, tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The span written for the first sentinel: the ids after a leading sentinel, up to the
    next sentinel or eos (all of them where there is no sentinel)."""
    sentinels = set(tokenizer.sentinel_ids)
    new = new[1:] if new and new[0] in sentinels else new
    end = next((i for i, t in enumerate(new) if t in sentinels or t == tokenizer.eos_id),
               len(new))
    return tokenizer.decode(new[:end])

  def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
    for i, prompt in enumerate(prompts):
      if not prompt:
        raise ValueError(f'Prompt {i} is empty; give at least one token of text.')
      if len(prompt) > self.cfg.max_len:
        raise ValueError(f"Prompt {i} is {len(prompt)} tokens but the encoder's context is "
                         f'{self.cfg.max_len} tokens; shorten the prompt.')
    if max_new_tokens + 1 > self.cfg.max_len:
      raise ValueError(f"--max_new_tokens={max_new_tokens} does not fit the decoder's context "
                       f'of {self.cfg.max_len} tokens (one slot holds the start token); lower it.')

  def start_decoding(self, params, ids_BP: Array, real_BP: Array) -> Decoding:
    """Encodes the prompts once; the decoder starts from the pad token, and its
    cross-attention keys and values are computed on the first step and cached."""
    model = EncoderDecoder(dataclasses.replace(self.cfg, decode=True))
    batch = ids_BP.shape[0]
    positions_BP = jnp.maximum(jnp.cumsum(real_BP, axis=1) - 1, 0)
    encoded_BPD = model.apply({'params': params}, ids_BP, real_BP, positions_BP,
                              method='encode')
    ones_B1 = jnp.ones((batch, 1), jnp.int32)

    def run(variables, encoded, token_B, position_B):
      logits_BTV, variables = model.apply(
          variables, encoded, real_BP, token_B[:, None], ones_B1, position_B[:, None],
          method='decode', mutable=['cache'])
      return logits_BTV[:, -1].astype(jnp.float32), variables['cache']

    start_B = jnp.full((batch,), self.decoder_start_id, jnp.int32)  # T5 starts from pad
    position_B = jnp.zeros((batch,), jnp.int32)
    logits_BV, cache = run({'params': params}, encoded_BPD, start_B, position_B)
    step = lambda cache, token_B, position_B: run({'params': params, 'cache': cache}, None,
                                                   token_B, position_B)
    return Decoding(logits_BV, cache, position_B, step, 1)  # the start token's slot

  def complete(self, params, tokenizer: Tokenizer, prompts: list[str], request: Request,
               on_token: Callable | None = None) -> list[str]:
    """Each prompt with its [MASK]s (or its end) filled by the spans the decoder writes."""
    prompt_ids = [span_prompt(tokenizer, p) for p in prompts]
    task = dataclasses.replace(self, decoder_start_id=tokenizer.pad_id)
    completions = base.continuations(task, params, prompt_ids, request, tokenizer.eos_id)
    return [fill_spans(tokenizer, ids, target) for ids, target in zip(prompt_ids, completions)]
