"""Direct preference optimisation (dpo; Rafailov et al. 2023): the model learns to prefer
the chosen answer of a {"prompt", "chosen", "rejected"} record to the rejected one, measured
against a frozen reference model: the run's init_from parameters (with LoRA, the base model
without its adapters, so no second copy is held).

With beta = dpo.beta and log p(y|x) summed over an answer's tokens and what closes it (the
tokens sft's loss weights, tasks/sft.py: the prompt is read, never scored), each pair gives

  reward(y) = beta (log p_policy(y|x) - log p_reference(y|x))
  loss = -log sigmoid(reward(chosen) - reward(rejected)).

A batch holds one pair per row: every array is [B, 2, ...], the chosen side at [:, 0] and
the rejected at [:, 1], each side laid out as sft lays out one record (the same chat template;
an encoder-decoder reads the prompt and writes the answer); the model reads them as 2B
sequences. The train and eval steps add the reference's log-probabilities
('reference_logps' [B, 2]) with `with_reference` before the loss. Metric sums are per pair
('weight' counts real pairs, so the step's means are per pair): loss, reward_accuracy (the
share of pairs whose chosen reward is the higher), chosen_reward, rejected_reward, margin,
chosen_likelier (the share of pairs whose chosen answer the policy finds the more likely);
and per answer token, the policy's log-probability of the chosen and the rejected answers
(chosen_token_logp, rejected_token_logp), which show whether the preferred answers become
more likely (DPO may lower both and still widen the margin).

A side longer than data.seq_len loses the start of its prompt (each side on its own, as sft
cuts a conversation), and the run logs how many pairs did.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from input_pipeline.pipeline import RecordExamples
from input_pipeline.tokenizer import Tokenizer
from models import normalize_metrics
from tasks.sft import PackedExamples, PairExamples, SFTDecoder, SFTEncoderDecoder, _log_cut

Array = jax.Array
REFERENCE = 'reference_logps'  # the batch key `with_reference` adds, [B, 2]


def conversations(record: dict) -> tuple[list[dict], list[dict]]:
  """The prompt (a user's message, or the conversation so far) answered by the chosen and by
  the rejected answer."""
  prompt = record['prompt']
  messages = prompt if isinstance(prompt, list) else [{'role': 'user', 'content': prompt}]
  return tuple(messages + [{'role': 'assistant', 'content': record[side]}]
               for side in ('chosen', 'rejected'))


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


class PreferenceExamples(RecordExamples):
  """One pair per row: each side is the row sft's `side` examples make of that conversation
  alone (`single_row`), and its arrays are stacked chosen-first into [2, ...]."""

  def __init__(self, seq_len: int, side: PackedExamples | PairExamples):
    super().__init__(seq_len)
    self.side = side

  def rows(self, records: list[dict]) -> list[tuple]:
    rows, cut = [], 0
    for record in records:
      (chosen, chosen_cut), (rejected, rejected_cut) = (
          self.side.single_row({'messages': c}) for c in conversations(record))
      rows.append((chosen, rejected))
      cut += chosen_cut or rejected_cut
    _log_cut('dpo', cut, len(records), self.seq_len, 'start of the prompt')
    return rows

  def make_example(self, row, rng):
    made = [self.side.make_example(side, rng) for side in row]
    return {k: np.stack([m[k] for m in made]) for k in made[0]}

  def row_tokens(self, row) -> int:
    return sum(self.side.row_tokens(side) for side in row)


def _sequences(batch) -> dict[str, Array]:
  """[B, 2, ...] pairs -> [2B, ...] sequences (row 2b chosen, 2b + 1 rejected)."""
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items() if k != REFERENCE}


class Preference:
  """What both families' dpo tasks share: pairs of sft rows, the reference's and the
  policy's log-probabilities of each answer, the loss and its results."""
  record_kind = 'dpo'
  uses_reference = True

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, cfg):
    return cls(cfg, beta=config.dpo.beta)

  @classmethod
  def config_problem(cls, config: ml_collections.ConfigDict, selected: bool) -> str | None:
    if not config.dpo.beta > 0:
      return f'dpo.beta={config.dpo.beta} must be positive (0.1 is usual); set --config.dpo.beta.'
    if selected and not config.init_from:
      return ("task='dpo' measures the model against a frozen reference, the model it starts "
              'from; set --config.init_from to that run (e.g. an sft workdir).')
    if selected and config.train.z_loss:
      return (f'train.z_loss={config.train.z_loss} has no meaning for task=dpo (its loss is on '
              'answers, not tokens); set --config.train.z_loss=0.')
    return None

  def examples(self, tokenizer: Tokenizer, seq_len: int) -> PreferenceExamples:
    return PreferenceExamples(seq_len, super().examples(tokenizer, seq_len))

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
    policy_B2, tokens_B2 = self.answer_logps(params, batch, train, dropout_rng)
    pairs_B = (tokens_B2[:, 0] > 0).astype(jnp.float32)  # a padding row scores nothing
    objective, sums = preference_sums(policy_B2, batch[REFERENCE], pairs_B, self.beta)
    # Per answer token ('X_token_count' divides 'X_token_logp', models/losses.py).
    for side, name in enumerate(('chosen', 'rejected')):
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
    return 2 * super().scored_length(seq_len)  # both sides of a pair

  def train_flops_per_step(self, params, batch_size: int, seq_len: int) -> float:
    """Both sides through the policy (forward and backward) and the reference (forward:
    a third of that)."""
    return super().train_flops_per_step(params, 2 * batch_size, seq_len) * 4 / 3


@dataclasses.dataclass(frozen=True)
class DPODecoder(Preference, SFTDecoder):
  """A decoder tuned to prefer the chosen answers; it answers prompts as sft does."""
  beta: float = 0.1

  name = 'dpo'


@dataclasses.dataclass(frozen=True)
class DPOEncoderDecoder(Preference, SFTEncoderDecoder):
  """An encoder-decoder tuned to prefer the chosen answers: log p(y|x) is the decoder's
  log-likelihood of the answer given the prompt (chat-formatted) as the encoder's input."""
  beta: float = 0.1

  name = 'dpo'

