"""The task interface: everything one training objective owns.

A task trains one model family on one kind of example. It builds the model from a
`ModelConfig`, turns the token stream into examples, computes the loss as metric
sums, counts its parameters and training FLOPs (for MFU and `--mode=estimate`) and,
where it has one, offers a decode entry point; a language model's task also turns text
into rows that score it (`scoring_rows`, `rolling_rows`, for evals/). `train/`, `scaling/`,
`inference/`, `evals/` and `main.py` call these methods and never ask which family or task
it is; `tasks/__init__.py` maps `config.task` to a class.

A task is a frozen (hashable) dataclass, so jitted functions take it as a static
argument.
"""
import dataclasses
import math
from typing import Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from inference import speculative
from inference.beam import beam_search
from inference.generate import Decoding, Request, generate
from input_pipeline.pipeline import Examples
from input_pipeline.tokenizer import Tokenizer
from models import normalize_metrics
from models.losses import chunked_cross_entropy_sums, cross_entropy_sums
from models.config import ModelConfig
from models.transformer import TokenHead
from train import flops

Array = jax.Array
Batch = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Task:
  """One training objective for one model family (subclasses fill in each part)."""
  cfg: ModelConfig
  z_loss: float = 0.0  # weight of log(Z)^2 in the token loss

  name: ClassVar[str] = ''  # the config.task value that selects it
  arch: ClassVar[str] = ''  # the model.arch it trains
  streams: ClassVar[bool] = False  # completions can be printed token by token
  prompt_is_output: ClassVar[bool] = False  # a generated continuation extends the prompt
  # A fine-tuning task's kind of record (input_pipeline/records.py); None: the task reads
  # the token stream of documents.
  record_kind: ClassVar[str | None] = None
  # The loss compares the model with a frozen reference model (DPO): the train and eval
  # steps call `with_reference` with the reference's parameters before the loss.
  uses_reference: ClassVar[bool] = False
  # Top-level modules the task adds to its family's pre-trained model (a classifier head):
  # absent from any init_from source, a LoRA run trains them in full (train/frozen.py), and
  # --mode=estimate, which reads no source, counts them as trained from this.
  new_modules: ClassVar[tuple[str, ...]] = ()
  # Its loss is `token_loss` (cross-entropy of the module's token logits), which
  # cfg.logits_chunk may compute over part of the sequence at a time.
  chunks_logits: ClassVar[bool] = False

  def __post_init__(self):
    if self.cfg.arch != self.arch:
      raise ValueError(f"Task '{self.name}' trains model.arch='{self.arch}', not "
                       f"'{self.cfg.arch}'.")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, cfg: ModelConfig) -> 'Task':
    """The task with its settings from the run config (`cfg` is the built model's)."""
    return cls(cfg, config.train.z_loss)

  @classmethod
  def config_problem(cls, config: ml_collections.ConfigDict, selected: bool) -> str | None:
    """What is wrong with this task's section of the run config (one line), or None;
    `selected`: the run trains this task (cross-field checks apply only then)."""
    return None

  @classmethod
  def model_fields(cls, config: ml_collections.ConfigDict) -> dict:
    """ModelConfig fields this task sets from the run config (e.g. an extra head)."""
    return {}

  @classmethod
  def settle_config(cls, config: ml_collections.ConfigDict, splits: dict) -> None:
    """Fills in, in place, the run-config fields this task reads from its data (e.g.
    classification's label set) before the model is built; they are saved with the run,
    so a restarted run or `--mode=eval` reads the same. Nothing by default."""

  # --- the model --------------------------------------------------------------
  def module(self, train: bool) -> nn.Module:
    raise NotImplementedError

  def model_inputs(self, batch: Batch) -> tuple:
    """The module's positional arguments, taken from a batch."""
    raise NotImplementedError

  def apply(self, params, batch: Batch, train: bool = False, dropout_rng=None,
            module: nn.Module | None = None):
    """The module's outputs (`module`: another of the same parameters, default
    self.module(train)); dropout (train only) draws from `dropout_rng`."""
    rngs = {'dropout': dropout_rng} if train else {}
    module = self.module(train) if module is None else module
    return module.apply({'params': params}, *self.model_inputs(batch), rngs=rngs)

  def init(self, rng: Array, batch: Batch):
    """Boxed (logically partitioned) parameters."""
    return self.module(False).init(rng, *self.model_inputs(batch))['params']

  def logits(self, params, batch: Batch, train: bool = False, dropout_rng=None) -> Array:
    """Token logits [B, T, V]."""
    return self.apply(params, batch, train, dropout_rng)

  def loss(self, params, batch: Batch, dropout_rng: Array | None, train: bool):
    """(scalar to differentiate, metric sums); the step divides both by the summed
    'weight' once, so micro-batches and hosts add up exactly."""
    raise NotImplementedError

  def token_loss(self, params, batch: Batch, dropout_rng: Array | None, train: bool):
    """`cross_entropy_sums` of the module's token logits against batch['targets'] and
    ['weights']. With cfg.logits_chunk the module returns its last hidden states and the
    output head (TokenHead) runs over that many positions at a time; a chunk's LoRA dropout
    (the only dropout in the head) draws from the key folded with the chunk's index."""
    targets_BT, weights_BT = batch['targets'], batch['weights']
    if not self.cfg.logits_chunk:
      logits_BTV = self.logits(params, batch, train, dropout_rng)
      return cross_entropy_sums(logits_BTV, targets_BT, weights_BT, self.z_loss)
    h_BTD = self.apply(params, batch, train, dropout_rng,
                       module=self.module(train).clone(return_hidden=True))
    head = TokenHead(self.cfg, deterministic=not train)
    head_params = {'params': {k: params[k] for k in ('token_embed', 'head') if k in params}}

    def logits_fn(h_BcD, c):
      chunk_rngs = {'dropout': jax.random.fold_in(dropout_rng, c)} if train else {}
      return head.apply(head_params, h_BcD, rngs=chunk_rngs)
    return chunked_cross_entropy_sums(logits_fn, h_BTD, targets_BT, weights_BT,
                                      self.cfg.logits_chunk, self.z_loss)

  def normalizers(self, batch: Batch) -> dict[str, Array]:
    """Totals of a whole step's batch that `loss` needs before differentiating (e.g. a
    per-example term's example count); the train step computes them once and passes
    them to every micro-batch's `loss` as keyword arguments. None by default ({})."""
    return {}

  def with_reference(self, reference_params, batch: Batch) -> Batch:
    """The batch plus what `loss` needs of the frozen reference model, for a task that
    `uses_reference`. The steps call it on each micro-batch (and eval batch), with no
    gradient flowing into it."""
    return batch

  def eval_results(self, totals: dict[str, float]) -> dict[str, float]:
    """The eval pass's results (named eval_*) from its summed metrics (the eval step's
    sums plus 'bytes', the UTF-8 bytes of the scored tokens): loss, bits per byte,
    token accuracy and perplexity of a token-level loss, then `eval_metrics`."""
    means = normalize_metrics(totals)
    results = {'eval_loss': means['loss'],
               'eval_bits_per_byte': totals['loss'] / max(totals['bytes'], 1.0) / math.log(2),
               'eval_accuracy': means['correct'], 'eval_tokens': totals['weight'],
               'eval_perplexity': math.exp(min(means['loss'], 50.0))}
    results.update(self.eval_metrics(means))
    return results

  def eval_metrics(self, means: dict[str, float]) -> dict[str, float]:
    """Task-specific eval results (named eval_*) from the eval pass's metric means,
    beside the loss, bits per byte and token accuracy every task reports."""
    return {}

  def generation_metrics(self, params, tokenizer: Tokenizer, records: list[dict],
                         limit: int) -> dict[str, float]:
    """Eval results that need decoding (named eval_*), from up to `limit` validation
    records of a record task. None by default ({})."""
    return {}

  def predict(self, params, tokenizer: Tokenizer, records: list[dict],
              batch_size: int) -> list[dict]:
    """`--mode=predict`: one result per record."""
    raise ValueError(f"--mode=predict needs a classification run; this run's task is "
                     f"'{self.name}'.")

  # --- scoring text (evals/) ----------------------------------------------------
  def scoring_rows(self, tokenizer: Tokenizer, context: list[int],
                   continuation: list[int]) -> list[dict]:
    """Unpadded rows (numpy arrays) whose `loglikelihoods` add up to log p(continuation |
    context): one for a decoder or an encoder-decoder, one per continuation token for an
    encoder (pseudo-log-likelihood)."""
    raise ValueError(self._cannot_score())

  def context_room(self, tokenizer: Tokenizer, continuation_length: int, length: int) -> int:
    """Context tokens that fit beside `continuation_length` scored tokens in a context of
    `length` positions (generating n tokens takes the room of scoring n + 1)."""
    raise ValueError(self._cannot_score())

  def _cannot_score(self) -> str:
    return (f"A '{self.name}' run cannot score text as a language model; evaluation tasks "
            'need a causal_lm, masked_lm, span_corruption, sft or seq2seq run.')

  def loglikelihoods(self, params, batch: Batch) -> Array:
    """Σ weights · log p(target) over each row of a batch of `scoring_rows` [B], float32:
    the target's logit minus the log-sum-exp of its row, so no float32 [B, T, V] copy of
    the logits (a log_softmax) is made beside them."""
    logits_BTV = self.logits(params, batch)
    target_BT = jnp.take_along_axis(logits_BTV, batch['targets'][..., None],
                                    axis=-1)[..., 0].astype(jnp.float32)
    log_p_BT = target_BT - jax.nn.logsumexp(logits_BTV.astype(jnp.float32), axis=-1)
    weights_BT = batch['weights']
    return jnp.sum(jnp.where(weights_BT > 0, log_p_BT * weights_BT, 0.0), axis=1)

  def rolling_rows(self, tokenizer: Tokenizer, text: list[int], length: int,
                   overlap: int) -> list[dict]:
    """Windows of `length` positions scoring every token of one document once."""
    raise ValueError(self._cannot_roll())

  def stream_rows(self, tokenizer: Tokenizer, tokens, length: int, overlap: int) -> list[dict]:
    """Windows of `length` positions scoring every token of a token stream after its first
    once, packed as training packs the stream (documents split at eos)."""
    raise ValueError(self._cannot_roll())

  def _cannot_roll(self) -> str:
    return (f"Rolling log-likelihood (perplexity of texts) needs a decoder run; this run's "
            f"task '{self.name}' trains model.arch='{self.arch}'.")

  def decoding_task(self, tokenizer: Tokenizer) -> 'Task':
    """The task that decodes with `tokenizer` (its start token set where it has one)."""
    return self

  def generation_prompt(self, tokenizer: Tokenizer, context: list[int]) -> list[int]:
    """The ids a generation task's context is decoded from."""
    raise ValueError(f"Generation tasks need a decoder or encoder-decoder run; this run's task "
                     f"'{self.name}' trains model.arch='{self.arch}'.")

  def generated_text(self, tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text of the ids decoded after `prompt` (without the stop id that ended them)."""
    return tokenizer.decode(new)

  def generation_stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids that end generated text: the first is the one training put after every target
    (decoding stops at it, and an encoder-decoder's scored continuation ends with it), any
    of them ends the text. The tokenizer's eos by default."""
    return (tokenizer.eos_id,)

  def example_batch(self, batch_size: int, seq_len: int) -> Batch:
    """Zeros of every input's shape and dtype at `seq_len`, for init and tracing."""
    raise NotImplementedError

  def train_batch(self, batch_size: int, seq_len: int) -> Batch:
    """Zeros shaped like the batches a run of `data.seq_len=seq_len` trains on."""
    return self.example_batch(batch_size, seq_len)

  def scored_length(self, seq_len: int) -> int:
    """Positions per example that get logits (the output head's tokens)."""
    return seq_len

  # --- data -------------------------------------------------------------------
  def examples(self, tokenizer: Tokenizer, seq_len: int) -> Examples:
    """How the token stream becomes this task's examples."""
    raise NotImplementedError

  # --- accounting -------------------------------------------------------------
  def param_counts(self) -> dict[str, int]:
    """Exact parameters by part, from the config alone (tested against the model)."""
    raise NotImplementedError

  def train_flops_per_step(self, params, batch_size: int, seq_len: int) -> float:
    """Training FLOPs of one step (train/flops.py has the formulas): each matmul
    parameter's over the tokens it multiplies (`matmul_tokens`), and attention's
    products (`attention_products`). It is train_flops_with_frozen with nothing frozen:
    a task with another step overrides that one."""
    return self.train_flops_with_frozen(params, batch_size, seq_len, None)

  def forward_flops_per_step(self, params, batch_size: int, seq_len: int) -> float:
    """FLOPs of one forward pass over a step's batch: a third of train_flops_per_step
    (whose backward costs two forwards)."""
    return self.train_flops_per_step(params, batch_size, seq_len) / 3

  def output_is_embedding(self) -> bool:
    """Whether the output projection multiplies by the input embedding (tied weights): a
    matmul per token, which train/flops.py counts; otherwise the embedding is a lookup."""
    return self.cfg.tie_embeddings

  def matmul_tokens(self, seq_len: int) -> dict[str, int]:
    """Tokens per example that each part's matmul parameters (train/flops.py
    `matmul_param_counts`) multiply: every token, by default; a pooler's or classifier's,
    one per sequence."""
    return dict.fromkeys(('encoder', 'decoder', 'cross_kv', 'other'), seq_len) | {'sequence': 1}

  @property
  def stack(self) -> str:
    """The parameter tree's name for a one-stack model's layers: 'encoder' for an
    encoder, else 'decoder' (an encoder-decoder has both)."""
    return 'encoder' if self.arch == 'encoder' else 'decoder'

  def attention_products(self, seq_len: int) -> list[tuple[str, str, int, int, int]]:
    """(stack, attention, layers, queries, keys) per example of each kind of attention the
    step runs (train/flops.py `attention_train_flops`): the stack's self-attention over
    every token, by default."""
    return [(self.stack, 'self_attention', self.cfg.num_layers, seq_len, seq_len)]

  def train_flops_with_frozen(self, params, batch_size: int, seq_len: int,
                              frozen_params) -> float:
    """train_flops_per_step when `frozen_params` (a subtree of `params`, or None: LoRA's
    frozen base) get no weight gradient, and what no trained parameter lies below no
    input gradient either (train/flops.py)."""
    cfg = self.cfg
    trained = flops.Trained(params, frozen_params)
    per_example = (flops.matmul_train_flops(params, self.matmul_tokens(seq_len),
                                            self.output_is_embedding(), trained)
                   + flops.attention_train_flops(cfg.num_heads * cfg.head_dim,
                                                 self.attention_products(seq_len), trained))
    return batch_size * per_example

  # --- decoding ---------------------------------------------------------------
  def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
    raise ValueError(f"Generation needs a decoder or encoder-decoder task; this run's task "
                     f"'{self.name}' trains model.arch='{self.arch}' (an encoder run fills "
                     '[MASK]s instead).')

  def start_decoding(self, params, ids_BP: Array, real_BP: Array) -> Decoding:
    """Prefills left-padded prompts over a fresh key/value cache (traced in a jit)."""
    raise NotImplementedError

  def complete(self, params, tokenizer: Tokenizer, prompts: list[str], request: Request,
               on_token: Callable | None = None) -> list[str]:
    """`--mode=sample`: the text to print for each prompt."""
    raise NotImplementedError


def continuations(task: Task, params, prompt_ids: list[list[int]], request: Request,
                  eos_id: int, on_token: Callable | None = None) -> list[list[int]]:
  """New token ids for each prompt, by beam search, speculative decoding with the
  request's draft model, or sampling, as the request says; a row ends at `eos_id` (the
  tokenizer's)."""
  if request.draft is not None:
    speculative.check_request(request.sampling, request.draft.num_tokens, request.beam_size)
    return speculative.generate(task, params, request.draft, prompt_ids, request.max_new_tokens,
                                request.sampling, request.seed, eos_id=eos_id,
                                quantize=request.quantize)
  if request.beam_size:
    return beam_search(task, params, prompt_ids, request.max_new_tokens, request.beam_size,
                       request.length_penalty, eos_id=eos_id, quantize=request.quantize)
  return generate(task, params, prompt_ids, request.max_new_tokens, request.sampling,
                  request.seed, eos_id=eos_id, on_token=on_token, quantize=request.quantize)


# --- exact parameter counts, shared by the families -----------------------------
def norm_params(cfg: ModelConfig) -> int:
  return cfg.d_model * (2 if cfg.norm == 'layernorm' else 1)


def block_params(cfg: ModelConfig, cross: bool = False) -> int:
  """One transformer block: norms, self-attention (and cross-attention), MLP."""
  D, N, G, K, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  bias = cfg.use_bias
  attention = 2 * D * N * K + 2 * D * G * K + bias * (N * K + 2 * G * K + D)
  up_projections = 2 if cfg.gated_mlp else 1
  mlp = up_projections * D * F + F * D + bias * (up_projections * F + D)
  return 2 * norm_params(cfg) + attention + mlp + cross * (norm_params(cfg) + attention)


def lora_part(cfg: ModelConfig, blocks: int, cross_blocks: int = 0) -> dict[str, int]:
  """{'lora': LoRA's adapter parameters} ({} without LoRA): A [inputs, r] and B [r, outputs]
  (models/lora.py) beside each targeted kernel of `blocks` transformer blocks, of the
  cross-attention of `cross_blocks` of them, and of an untied output projection."""
  r, targets = cfg.lora_rank, cfg.lora_targets
  if not r:
    return {}
  D, N, G, K, F = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  up_projections = 2 if cfg.gated_mlp else 1  # a gated MLP's gate is an 'mlp_in' too
  inputs_and_outputs = {'q': D + N * K, 'k': D + G * K, 'v': D + G * K, 'o': N * K + D,
                        'mlp_in': up_projections * (D + F), 'mlp_out': F + D}
  attention = sum(inputs_and_outputs[t] for t in ('q', 'k', 'v', 'o') if t in targets)
  mlp = sum(inputs_and_outputs[t] for t in ('mlp_in', 'mlp_out') if t in targets)
  lm_head = 'head' in targets and not cfg.tie_embeddings and not cfg.num_labels
  return {'lora': r * (blocks * (attention + mlp) + cross_blocks * attention
                       + lm_head * (D + cfg.vocab_size))}


def decoder_layers(cfg: ModelConfig) -> int:
  """An encoder-decoder's decoder depth."""
  return cfg.num_decoder_layers or cfg.num_layers


def input_params(cfg: ModelConfig) -> int:
  """Tables added to one stack's token embeddings: learned positions, token types, the
  embedding norm, and T5's relative position bias."""
  learned = cfg.max_len * cfg.d_model if cfg.position == 'learned' else 0
  relative = cfg.relative_buckets * cfg.num_heads if cfg.position == 'relative' else 0
  return (learned + cfg.num_token_types * cfg.d_model + relative
          + cfg.embed_norm * norm_params(cfg))


def head_params(cfg: ModelConfig) -> int:
  """The final norm, the MLM transform, the output projection (untied) and bias."""
  D = cfg.d_model
  transform = D * D + cfg.use_bias * D + norm_params(cfg)
  return (cfg.final_norm * norm_params(cfg) + cfg.mlm_transform * transform
          + (0 if cfg.tie_embeddings else D * cfg.vocab_size) + cfg.output_bias * cfg.vocab_size)
