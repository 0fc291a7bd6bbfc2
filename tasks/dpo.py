"""Direct preference optimisation (dpo; Rafailov et al. 2023): the model learns to prefer
the chosen answer of a {"prompt", "chosen", "rejected"} record to the rejected one, measured
against a frozen reference model: the run's init_from parameters (with LoRA, the base model
without its adapters, so no second copy is held).

With beta = dpo.beta and log p(y|x) summed over the final answer's tokens and what closes it
(as sft's loss weights an answer, tasks/sft.py; the prompt, earlier assistant turns of a
conversation included, is read, never scored), each pair gives

  reward(y) = beta (log p_policy(y|x) - log p_reference(y|x))
  loss = -log sigmoid(reward(chosen) - reward(rejected)),

plus, where dpo.sft_weight > 0, that weight times the chosen answer's negative
log-likelihood per token (RPO, Pang et al. 2024; TRL's rpo_alpha, which averages it over the
batch's tokens rather than per pair): it keeps the chosen answers likely while the margin
grows. The policy's log-probabilities run without the model's dropout (the adapters'
included), as the reference's do (dpo.disable_dropout, True by default, as TRL's): with it
the two would differ at step 0 (the loss not ln 2) and the sides draw independent masks.

A batch holds one pair per row: every array is [B, 2, ...], the chosen side at [:, 0] and
the rejected at [:, 1], each side laid out as sft lays out one record (the same chat template;
an encoder-decoder reads the prompt and writes the answer); the model reads them as 2B
sequences. The train and eval steps add the reference's log-probabilities
('reference_logps' [B, 2]) with `with_reference` before the loss. Metric sums are per pair
('weight' counts real pairs, so the step's means are per pair): loss (DPO's term alone),
reward_accuracy (the share of pairs whose chosen reward is strictly the higher: a tie counts
as wrong, as in TRL, so the reference itself scores 0), chosen_reward, rejected_reward, margin,
chosen_likelier (the share of pairs whose chosen answer the policy finds the more likely);
and per answer token, the policy's log-probability of the chosen and the rejected answers
(chosen_token_logp, rejected_token_logp), which show whether the preferred answers become
more likely (DPO may lower both and still widen the margin).

A pair is cut to data.seq_len once, for both sides (as TRL cuts it), so both read the same
prompt: a decoder's prompt loses its start, as much as the longer answer needs (answers stay
whole, as sft keeps them) but keeping at least a quarter of the room, and an answer that
still does not fit loses its end; an encoder-decoder's encoder reads the prompt's last
data.seq_len tokens and its decoder writes each answer's first data.seq_len. The run logs
how many pairs lost which.
"""
import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from input_pipeline.chat import ChatTemplate
from input_pipeline.pipeline import RecordExamples
from input_pipeline.tokenizer import Tokenizer
from models import lora, normalize_metrics
from tasks.sft import PackedExamples, PairExamples, SFTDecoder, SFTEncoderDecoder

Array = jax.Array
REFERENCE = 'reference_logps'  # the batch key `with_reference` adds, [B, 2]


SIDES = ('chosen', 'rejected')


def prompt_messages(record: dict) -> list[dict]:
  """What both answers reply to: a user's message, or the conversation so far."""
  prompt = record['prompt']
  return prompt if isinstance(prompt, list) else [{'role': 'user', 'content': prompt}]


def preference_sums(policy_B2: Array, reference_B2: Array, pairs_B: Array,
                    beta: float) -> tuple[Array, dict[str, Array]]:
  """(summed loss, metric sums) of DPO on answers' log-probabilities [B, 2] (chosen,
  rejected); `pairs_B` is 1 for a real pair, 0 for a padding row."""
  rewards_B2 = beta * (policy_B2 - reference_B2)
  margin_B = rewards_B2[:, 0] - rewards_B2[:, 1]
  total = lambda x_B: jnp.sum(x_B * pairs_B)
  sums = {'loss': total(-jax.nn.log_sigmoid(margin_B)),
          'reward_accuracy': total((margin_B > 0).astype(jnp.float32)),
          'chosen_reward': total(rewards_B2[:, 0]), 'rejected_reward': total(rewards_B2[:, 1]),
          'margin': total(margin_B),
          'chosen_likelier': total((policy_B2[:, 0] > policy_B2[:, 1]).astype(jnp.float32)),
          'weight': jnp.sum(pairs_B)}
  return sums['loss'], sums


def preference_objective(policy_B2: Array, reference_B2: Array, tokens_B2: Array,
                         pairs_B: Array, beta: float,
                         sft_weight: float) -> tuple[Array, dict[str, Array]]:
  """(summed objective, metric sums): DPO's (`preference_sums`) plus `sft_weight` times each
  pair's chosen answer's negative log-likelihood per token (`tokens_B2`: answer tokens)."""
  objective, sums = preference_sums(policy_B2, reference_B2, pairs_B, beta)
  if sft_weight:
    nll_B = -policy_B2[:, 0] / jnp.maximum(tokens_B2[:, 0], 1.0)
    objective = objective + sft_weight * jnp.sum(nll_B * pairs_B)
  return objective, sums


class PreferenceExamples(RecordExamples):
  """One pair per row: `split(record)` gives the prompt's ids and each answer's (chosen
  first), `fit(prompt, answers)` cuts them to data.seq_len once for the pair and lays each
  side out as a row of sft's `side` examples (and says whether the prompt and an answer
  lost tokens); the sides' arrays are stacked chosen-first into [2, ...]. `cut_log`
  (str.format: cut, total, seq_len, prompts, answers) says what a cut pair lost."""

  def __init__(self, seq_len: int, side: PackedExamples | PairExamples,
               split: Callable[[dict], tuple[list[int], list[list[int]]]],
               fit: Callable[[list[int], list[list[int]]], tuple[list, bool, bool]],
               cut_log: str):
    super().__init__(seq_len)
    self.side, self.split, self.fit, self.cut_log = side, split, fit, cut_log

  def rows(self, records: list[dict]) -> list[tuple]:
    rows, prompts, answers, cut = [], 0, 0, 0
    for record in records:
      sides, prompt_cut, answer_cut = self.fit(*self.split(record))
      rows.append(tuple(sides))
      prompts, answers, cut = prompts + prompt_cut, answers + answer_cut, cut + (
          prompt_cut or answer_cut)
    if cut:
      logging.info(self.cut_log.format(cut=cut, total=len(records), seq_len=self.seq_len,
                                        prompts=prompts, answers=answers))
    return rows

  def make_example(self, row, rng):
    made = [self.side.make_example(side, rng) for side in row]
    return {k: np.stack([m[k] for m in made]) for k in made[0]}

  def row_tokens(self, row) -> int:
    return sum(self.side.row_tokens(side) for side in row)


def _sequences(batch) -> dict[str, Array]:
  """[B, 2, ...] pairs -> [2B, ...] sequences (row 2b chosen, 2b + 1 rejected)."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k != REFERENCE}


@dataclasses.dataclass(frozen=True)
class Preference:
  """What both families' dpo tasks share: pairs of sft rows, the reference's and the
  policy's log-probabilities of each answer, the loss and its results. A family's class
  says how a record splits into prompt and answers (`split_pair`), how a pair is cut and
  laid out (`fit_pair`), and which sft task lays out one side (`side_task`)."""
  beta: float = 0.1
  disable_dropout: bool = True  # the policy's log-probabilities without dropout
  sft_weight: float = 0.0  # weight of the chosen answers' NLL per token beside DPO's loss
  record_kind = 'dpo'
  uses_reference = True
  chunks_logits = False  # its loss sums each answer's log-probabilities, not a token loss
  side_task: ClassVar[type] = None
  cut_log: ClassVar[str] = ''

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, cfg):
    d = config.dpo
    return cls(cfg, beta=d.beta, disable_dropout=d.disable_dropout, sft_weight=d.sft_weight)

  @classmethod
  def config_problem(cls, config: ml_collections.ConfigDict, selected: bool) -> str | None:
    # The section's own values are checked whatever the task (as masked_lm's and
    # span_corruption's are); what depends on the run only where the run is dpo.
    if not config.dpo.beta > 0:
      return f'dpo.beta={config.dpo.beta} must be positive (0.1 is usual); set --config.dpo.beta.'
    if not config.dpo.sft_weight >= 0:
      return (f'dpo.sft_weight={config.dpo.sft_weight} must be 0 (off) or positive (1.0 is '
              'usual); set --config.dpo.sft_weight.')
    if selected and not config.init_from:
      return ("task='dpo' measures the model against a frozen reference, the model it starts "
              'from; set --config.init_from to that run (e.g. an sft workdir).')
    if selected and config.train.z_loss:
      return (f'train.z_loss={config.train.z_loss} has no meaning for task=dpo (its loss is on '
              'answers, not tokens); set --config.train.z_loss=0.')
    return None

  def examples(self, tokenizer: Tokenizer, seq_len: int) -> PreferenceExamples:
    template = ChatTemplate(tokenizer)
    return PreferenceExamples(seq_len, super().examples(tokenizer, seq_len),
                              lambda record: self.split_pair(template, record),
                              lambda prompt, answers: self.fit_pair(prompt, answers, seq_len),
                              self.cut_log)

  def answer_logps(self, params, batch, train: bool = False,
                   dropout_rng=None) -> tuple[Array, Array]:
    """(log p(answer | prompt) [B, 2], answer tokens [B, 2]): each side's target
    log-probabilities summed over its weighted (answer) positions, in float32."""
    sequences = _sequences(batch)
    logits_NTV = self.logits(params, sequences, train, dropout_rng).astype(jnp.float32)
    targets_NT, weights_NT = sequences['targets'], sequences['weights']
    target_logit_NT = jnp.take_along_axis(logits_NTV, targets_NT[..., None], axis=-1)[..., 0]
    logp_NT = target_logit_NT - jax.nn.logsumexp(logits_NTV, axis=-1)
    pairs = batch['targets'].shape[0]
    return (jnp.sum(logp_NT * weights_NT, axis=-1).reshape(pairs, 2),
            jnp.sum(weights_NT, axis=-1).reshape(pairs, 2))

  def with_reference(self, reference_params, batch):
    logps_B2, _ = self.answer_logps(reference_params, batch)
    return batch | {REFERENCE: jax.lax.stop_gradient(logps_B2)}

  def loss(self, params, batch, dropout_rng, train: bool):
    policy_B2, tokens_B2 = self.answer_logps(params, batch, train and not self.disable_dropout,
                                             dropout_rng)
    pairs_B = (tokens_B2[:, 0] > 0).astype(jnp.float32)  # a padding row scores nothing
    objective, sums = preference_objective(policy_B2, batch[REFERENCE], tokens_B2, pairs_B,
                                           self.beta, self.sft_weight)
    # Per answer token ('X_token_count' divides 'X_token_logp', models/losses.py).
    for side, name in enumerate(SIDES):
      sums[f'{name}_token_logp'] = jnp.sum(policy_B2[:, side] * pairs_B)
      sums[f'{name}_token_count'] = jnp.sum(tokens_B2[:, side] * pairs_B)
    return objective, sums

  def eval_results(self, totals: dict[str, float]) -> dict[str, float]:
    """Per pair: loss, reward accuracy, rewards, margin; per answer token: the policy's
    log-probability of chosen and rejected answers (bits per byte would mean nothing)."""
    means = normalize_metrics(totals)
    names = ('loss', 'reward_accuracy', 'chosen_reward', 'rejected_reward', 'margin',
             'chosen_likelier', 'chosen_token_logp', 'rejected_token_logp')
    return {f'eval_{k}': float(means[k]) for k in names} | {'eval_pairs': totals['weight']}

  def train_batch(self, batch_size: int, seq_len: int):
    """Pairs of the side's batches, and the reference's log-probabilities: what `loss`
    reads."""
    side = super().train_batch(batch_size, seq_len)
    pairs = {k: jnp.stack([v, v], axis=1) for k, v in side.items()}
    return pairs | {REFERENCE: jnp.zeros((batch_size, 2), jnp.float32)}

  def scored_length(self, seq_len: int) -> int:
    return 2 * super().scored_length(seq_len)  # both sides of a pair (per batch row)

  def forward_flops_per_step(self, params, batch_size: int, seq_len: int) -> float:
    """The model's forward pass over both sides of each pair (not a third of the step,
    which also holds the reference's forward)."""
    return self.side_task(self.cfg).forward_flops_per_step(params, 2 * batch_size, seq_len)

  def train_flops_with_frozen(self, params, batch_size: int, seq_len: int,
                              frozen_params) -> float:
    """Both sides of each pair through the policy (sft's step on 2 batch_size sequences,
    its frozen kernels discounted) and through the reference (a forward pass of the model
    without its adapters: no gradient of it is taken). The side task counts them (this
    task's own matmul_tokens and attention_products, over a pair's doubled scored length,
    are not used)."""
    side = self.side_task(self.cfg)
    sides = 2 * batch_size
    return (side.train_flops_with_frozen(params, sides, seq_len, frozen_params)
            + side.forward_flops_per_step(lora.base(params), sides, seq_len))


@dataclasses.dataclass(frozen=True)
class DPODecoder(Preference, SFTDecoder):
  """A decoder tuned to prefer the chosen answers; it answers prompts as sft does."""

  name = 'dpo'
  side_task = SFTDecoder
  cut_log = ('dpo: {cut} of {total} pairs do not fit data.seq_len={seq_len}: {prompts} lost '
             'the start of its prompt (the same tokens on both sides), {answers} the end of an '
             'answer (the prompt keeps at least a quarter of the room).')

  def split_pair(self, template: ChatTemplate, record: dict) -> tuple[list[int], list[list[int]]]:
    """(the prompt's ids through the assistant's marker, each answer's ids and what closes
    it): each side's conversation rendered whole, as sft renders it, the final answer the
    rendering's tokens after the prompt's (an earlier assistant turn is prompt)."""
    messages = prompt_messages(record)
    prompt = self.prompt_ids(template, messages)
    answers = []
    for side in SIDES:
      ids, weights = template.render(messages + [{'role': 'assistant', 'content': record[side]}])
      end = 1 + max(i for i, w in enumerate(weights) if w)  # nothing after the answer
      if ids[:len(prompt)] != prompt or end <= len(prompt):
        raise ValueError("The chat template renders a conversation's final answer so that the "
                         'prompt before it does not end where the answer starts; its answers '
                         'cannot be located for the loss.')
      answers.append(ids[len(prompt):end])
    return prompt, answers

  def fit_pair(self, prompt: list[int], answers: list[list[int]],
               seq_len: int) -> tuple[list, bool, bool]:
    """Each side one sequence, prompt then answer (inputs ids[:-1], targets ids[1:],
    weight 1 on the answer's targets): the prompt cut from the left once for both sides,
    as the longer answer needs, but keeping at least a quarter of the room (as TRL keeps
    max_prompt_length), an answer that still does not fit from the right."""
    room = seq_len + 1  # ids of one sequence
    keep = min(len(prompt), max(room - max(map(len, answers)), room // 4))
    kept = prompt[len(prompt) - keep:]
    sides = []
    for answer in answers:
      ids = kept + answer[:room - keep]
      weights = [0.0] * keep + [1.0] * (len(ids) - keep)
      sides.append([(np.asarray(ids[:-1], np.int32), np.asarray(ids[1:], np.int32),
                     np.asarray(weights[1:], np.float32))])
    return sides, keep < len(prompt), any(len(a) > room - keep for a in answers)


@dataclasses.dataclass(frozen=True)
class DPOEncoderDecoder(Preference, SFTEncoderDecoder):
  """An encoder-decoder tuned to prefer the chosen answers: log p(y|x) is the decoder's
  log-likelihood of the answer given the prompt (chat-formatted) as the encoder's input."""

  name = 'dpo'
  side_task = SFTEncoderDecoder
  cut_log = ('dpo: {cut} of {total} pairs do not fit data.seq_len={seq_len}: {prompts} lost '
             'the start of its prompt (the encoder reads its last {seq_len} tokens, the same on '
             'both sides), {answers} the end of an answer (the decoder writes its first '
             '{seq_len}).')

  def split_pair(self, template: ChatTemplate, record: dict) -> tuple[list[int], list[list[int]]]:
    """(the encoder's input, each answer's target) as sft's `to_pair` makes them."""
    return (self.prompt_ids(template, prompt_messages(record)),
            [template.answer_ids(record[side]) for side in SIDES])

  def fit_pair(self, prompt: list[int], answers: list[list[int]],
               seq_len: int) -> tuple[list, bool, bool]:
    """(encoder ids, target ids) per side: the prompt's last seq_len tokens, each answer's
    first seq_len."""
    sides = [(np.asarray(prompt[-seq_len:], np.int32), np.asarray(answer[:seq_len], np.int32))
             for answer in answers]
    return sides, len(prompt) > seq_len, any(len(a) > seq_len for a in answers)

