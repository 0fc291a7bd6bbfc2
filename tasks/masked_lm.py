"""Masked language modelling (BERT): an encoder-only model predicts the chosen tokens
([MASK]ed, replaced or kept) from both sides, plus, with the next-sentence head,
whether segment B follows segment A. Sampling fills a prompt's [MASK]s."""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from inference.fill_mask import fill_masks
from inference.generate import Request
from input_pipeline import masking
from input_pipeline.pipeline import Examples, segments_and_positions
from input_pipeline.tokenizer import SpecialIds, Tokenizer
from models.losses import cross_entropy_sums, example_batch
from models.transformer import EncoderOnly
from tasks import base


class MaskedExamples(Examples):
  """Windows of seq_len tokens (or, for next-sentence prediction, sentence pairs drawn
  from the documents), with mask_rate of their ordinary tokens chosen to predict;
  `special`: the tokenizer's ids ([MASK], and [CLS] / [SEP] for sentence pairs)."""

  def __init__(self, seq_len: int, vocab_size: int, mask_rate: float,
               word_starts: np.ndarray | None, next_sentence: bool, *, special: SpecialIds):
    super().__init__(seq_len, raw_length=seq_len)
    self.vocab_size, self.mask_rate = vocab_size, mask_rate
    self.word_starts, self.next_sentence = word_starts, next_sentence
    self.special = special
    if special.mask is None:
      raise ValueError('Masked LM needs a mask token and this tokenizer has none; use a '
                       "tokenizer with one (this project's, BERT's).")
    if next_sentence and None in (special.cls, special.sep):
      raise ValueError('Next-sentence pairs need [CLS] and [SEP] tokens and this tokenizer '
                       'lacks one; set masked_lm.next_sentence=False.')

  def source(self, tokens: np.ndarray):
    if not self.next_sentence:
      return super().source(tokens)
    ends = np.flatnonzero(np.asarray(tokens) == self.special.eos)  # each document ends in EOS
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return _SentencePairs(masking.Documents(tokens, starts, ends),
                          max(1, len(tokens) // self.seq_len))

  def make_example(self, item, rng: np.random.Generator):
    if self.next_sentence:
      example = masking.sentence_pair(item, rng, self.seq_len, special=self.special)
    else:
      segment_ids, positions = segments_and_positions(item, eos_id=self.special.eos)
      example = {'inputs': item.astype(np.int32), 'segment_ids': segment_ids,
                 'positions': positions, 'token_type_ids': np.zeros(self.seq_len, np.int32)}
    ids = example['inputs']
    starts = None if self.word_starts is None else self.word_starts[ids]
    example.update(masking.mask_tokens(ids, rng, self.vocab_size, self.mask_rate, starts,
                                       special=self.special))
    return example


class _SentencePairs:
  """`count` next-sentence examples per epoch; item i is the documents' index, built
  once (the pair itself is drawn by the per-example rng, reading at most two documents,
  so an example costs the same whatever the number of documents)."""

  def __init__(self, documents: masking.Documents, count: int):
    self.documents, self.count = documents, count

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, i: int) -> masking.Documents:
    return self.documents


@dataclasses.dataclass(frozen=True)
class MaskedLM(base.Task):
  """BERT's pre-training: masked tokens and, with the model's NSP head (`cfg.nsp_head`,
  from masked_lm.next_sentence), next-sentence prediction on [CLS] A [SEP] B [SEP] pairs."""
  mask_rate: float = 0.15  # share of ordinary tokens chosen; 80% [MASK], 10% random, 10% kept
  whole_word: bool = False  # choose whole words rather than single pieces

  name = 'masked_lm'
  arch = 'encoder'

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, cfg) -> 'MaskedLM':
    m = config.masked_lm
    return cls(cfg, config.train.z_loss, mask_rate=m.mask_rate, whole_word=m.whole_word)

  @classmethod
  def config_problem(cls, config: ml_collections.ConfigDict, selected: bool) -> str | None:
    m = config.masked_lm
    if not 0 < m.mask_rate < 1:
      return f'masked_lm.mask_rate={m.mask_rate} must be in (0, 1).'
    if selected and m.next_sentence and config.model.num_token_types < 2:
      return ('masked_lm.next_sentence needs segment A/B embeddings; set '
              'model.num_token_types=2.')
    return None

  @classmethod
  def model_fields(cls, config: ml_collections.ConfigDict) -> dict:
    return {'nsp_head': config.masked_lm.next_sentence}

  def module(self, train: bool):
    return EncoderOnly(self.cfg, deterministic=not train)

  def model_inputs(self, batch):
    return (batch['inputs'], batch['segment_ids'], batch['positions'],
            batch.get('token_type_ids'))

  def logits(self, params, batch, train: bool = False, dropout_rng=None):
    return self.apply(params, batch, train, dropout_rng)[0]

  def normalizers(self, batch):
    """The whole step's scored tokens and next-sentence examples (padding rows weigh 0)."""
    if not self.cfg.nsp_head:
      return {}
    return {'weight': jnp.sum(batch['weights']), 'nsp_count': jnp.sum(batch['nsp_weights'])}

  def loss(self, params, batch, dropout_rng, train: bool, weight=None, nsp_count=None):
    """`weight`, `nsp_count`: the whole step's totals (`normalizers`), so that after the
    step divides by its tokens the objective is token_sum / tokens + nsp_sum / examples,
    the same for any split into micro-batches; without them, this batch's own."""
    logits_BTV, nsp_logits_B2 = self.apply(params, batch, train, dropout_rng)
    objective, sums = cross_entropy_sums(logits_BTV, batch['targets'], batch['weights'],
                                         self.z_loss)
    if nsp_logits_B2 is not None:
      labels_B, weights_B = batch['nsp_labels'], batch['nsp_weights']
      log_p_B2 = jax.nn.log_softmax(nsp_logits_B2.astype(jnp.float32))
      nll_B = -jnp.take_along_axis(log_p_B2, labels_B[:, None], axis=-1)[:, 0]
      correct_B = (jnp.argmax(log_p_B2, -1) == labels_B).astype(jnp.float32)
      sums.update(nsp_loss=jnp.sum(nll_B * weights_B), nsp_count=jnp.sum(weights_B),
                  nsp_correct=jnp.sum(correct_B * weights_B))
      tokens = sums['weight'] if weight is None else weight
      examples = sums['nsp_count'] if nsp_count is None else nsp_count
      objective += sums['nsp_loss'] * jax.lax.stop_gradient(
          jnp.maximum(tokens, 1.0) / jnp.maximum(examples, 1.0))
    return objective, sums

  def eval_metrics(self, means: dict[str, float]) -> dict[str, float]:
    if 'nsp_loss' not in means:
      return {}
    return {'eval_nsp_loss': means['nsp_loss'], 'eval_nsp_accuracy': means['nsp_correct']}

  def example_batch(self, batch_size: int, seq_len: int):
    batch = example_batch(batch_size, seq_len)
    batch['token_type_ids'] = jnp.zeros((batch_size, seq_len), jnp.int32)
    if self.cfg.nsp_head:
      batch['nsp_labels'] = jnp.zeros((batch_size,), jnp.int32)
      batch['nsp_weights'] = jnp.ones((batch_size,), jnp.float32)
    return batch

  def examples(self, tokenizer: Tokenizer, seq_len: int) -> MaskedExamples:
    return MaskedExamples(seq_len, tokenizer.vocab_size, self.mask_rate,
                          tokenizer.word_starts if self.whole_word else None, self.cfg.nsp_head,
                          special=tokenizer.special)

  def param_counts(self) -> dict[str, int]:
    cfg = self.cfg
    D = cfg.d_model
    head = base.head_params(cfg)
    if cfg.nsp_head:  # pooler dense, next-sentence classifier
      head += D * D + D + 2 * D + 2
    return {'embedding': cfg.vocab_size * D + base.input_params(cfg),
            'encoder': cfg.num_layers * base.block_params(cfg), 'head': head,
            **base.lora_part(cfg, cfg.num_layers)}

  def complete(self, params, tokenizer: Tokenizer, prompts: list[str], request: Request,
               on_token: Callable | None = None) -> list[str]:
    """Each prompt with its [MASK]s replaced by the model's top prediction."""
    return fill_masks(self, params, tokenizer, prompts, self.cfg.max_len)

  def scoring_rows(self, tokenizer: Tokenizer, context: list[int], continuation: list[int]):
    """Pseudo-log-likelihood (Salazar et al. 2020): one row per continuation token, that
    token [MASK]ed and predicted from the rest of the framed text, left as it is."""
    if tokenizer.mask_id is None:
      raise ValueError(f'The tokenizer {tokenizer.path} has no mask token, so a masked LM '
                       'cannot score text; use a run whose tokenizer has one (BERT\'s).')
    before, after = self.prompt_frame(tokenizer)
    ids_T = np.asarray(before + context + continuation + after, np.int32)
    start = len(before) + len(context)
    rows = []
    for t in range(start, start + len(continuation)):
      inputs_T, weights_T = ids_T.copy(), np.zeros(len(ids_T), np.float32)
      inputs_T[t], weights_T[t] = tokenizer.mask_id, 1.0
      rows.append({'inputs': inputs_T, 'targets': ids_T, 'weights': weights_T,
                   'segment_ids': np.ones_like(ids_T), 'token_type_ids': np.zeros_like(ids_T),
                   'positions': np.arange(len(ids_T), dtype=np.int32)})
    return rows

  def context_room(self, tokenizer: Tokenizer, continuation_length: int, length: int) -> int:
    before, after = self.prompt_frame(tokenizer)
    return length - len(before) - len(after) - continuation_length

  def prompt_frame(self, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Ids around a fill-mask prompt, as training framed a segment ([CLS] A [SEP] with
    next-sentence pairs; nothing around plain windows)."""
    return masking.prompt_frame(self.cfg.nsp_head, tokenizer.special)
