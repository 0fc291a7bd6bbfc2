"""Defaults for every config field; other configs start here and change what differs.

Launch: python main.py --config=configs/default.py --workdir=runs/default
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # every random key of a run is split from this
  # compute: 'auto' (bf16 on GPU/TPU, f32 on CPU) | 'float32' | 'bfloat16' | 'float16'
  # (V100/T4 tensor cores; trains with dynamic loss scaling, train.loss_scale_*)
  config.dtype = 'auto'
  config.param_dtype = 'float32'  # parameters (and optimizer state) are stored in this
  # Start from another run's parameters (train/init_from.py): a workdir (its latest
  # checkpoint), DIR@STEP, or an imported workdir; the run takes that model's fields and
  # tokenizer; config.json pins the step. Its parameters are read when the run starts (and
  # again at every start of a LoRA or DPO run, which keep them frozen). Empty: from scratch.
  config.init_from = ''
  # LoRA (models/lora.py, train/frozen.py): rank > 0 trains low-rank adapters on `targets`
  # (comma-separated: q, k, v, o, mlp_in, mlp_out, head) of the init_from model, whose own
  # parameters stay frozen, out of the optimizer and out of this run's checkpoints. New
  # heads (a classifier) train in full. The adapters add (alpha / rank) x A B to a kernel.
  lora = config.lora = ml_collections.ConfigDict()
  lora.rank = 0
  lora.alpha = 16.0
  lora.dropout = 0.0
  lora.targets = 'q,k,v,o,mlp_in,mlp_out'
  # Parameters trained in full beside the adapters (comma-separated parts of their paths,
  # e.g. 'embedding' when the data has tokens the base never saw, such as chat markers).
  lora.train_in_full = ''

  model = config.model = ml_collections.ConfigDict()
  model.arch = 'decoder'  # 'decoder' (GPT) | 'encoder' (BERT) | 'encoder_decoder' (T5)
  model.num_layers = 4  # an encoder-decoder's encoder depth
  model.num_decoder_layers = 0  # an encoder-decoder's decoder depth; 0: num_layers
  model.num_heads = 4
  model.num_kv_heads = 0  # grouped-query attention; 0: same as num_heads
  model.d_model = 256
  model.d_ff = 1024  # MLP hidden size
  model.head_dim = 0  # 0: d_model // num_heads
  model.vocab_size = 0  # embedding rows; 0: tokenizer vocabulary rounded up to a multiple of 128
  model.max_len = 256  # longest sequence the positions support
  model.position = 'auto'  # 'learned' | 'sinusoidal' | 'rope' | 'relative' (T5 bias) |
  #                           'auto': rope (decoder), learned (encoder), relative (encoder_decoder)
  model.rope_theta = 10_000.0
  model.relative_buckets = 32  # T5's relative position bias: buckets, shared by both directions
  model.relative_max_distance = 128  # in an encoder; distances beyond share the last bucket
  model.norm = 'rmsnorm'  # 'layernorm' | 'rmsnorm'
  model.norm_eps = 1e-6
  model.block_order = 'pre_norm'  # 'pre_norm': x + f(norm(x)) | 'post_norm': norm(x + f(x)) (BERT)
  model.embed_norm = False  # a norm on the embedding sum (BERT)
  model.final_norm = True  # a norm on each stack's output
  model.activation = 'gelu_tanh'  # MLP: 'gelu_tanh' | 'gelu' (exact erf) | 'relu' | 'silu'
  model.gated_mlp = False  # act(x W_gate) * (x W_up): silu -> SwiGLU (Llama), gelu_tanh -> GeGLU
  model.attention_scale = 0.0  # multiplies q.k; 0: 1/sqrt(head_dim) (T5: 1.0)
  model.num_token_types = 0  # token-type (segment A/B) embeddings; BERT uses 2
  model.mlm_transform = False  # dense -> activation -> norm before the output projection (BERT)
  model.output_bias = False  # a learned bias per vocabulary entry on the logits (BERT)
  model.tie_embeddings = True  # output projection shares the token embedding
  model.tied_output_scale = False  # last hidden * d_model**-0.5 before the tied projection (T5 v1.0)
  model.use_bias = False  # biases in attention and MLP projections
  model.dropout = 0.0
  model.scan_layers = True  # nn.scan over layers: compile time does not grow with depth
  model.remat = 'none'  # 'none' | 'dots_saveable' | 'full'
  # 'auto' | 'xla' | 'cudnn' | 'splash'; auto (logged) is splash on TPU, cuDNN on GPU where
  # it compiles for the run's shapes, else XLA
  model.attention = 'auto'
  # >0: the token loss runs the output head and softmax over at most this many sequence
  # positions at a time, in equal chunks (recomputed in the backward pass), so the
  # [batch, seq, vocab] logits never exist whole: less memory for a large vocabulary, same
  # loss and gradients (LoRA dropout on an adapted head draws a mask per chunk). 0: at once
  model.logits_chunk = 0

  # What the run trains (tasks/): 'auto' follows model.arch: causal_lm (decoder),
  # masked_lm (encoder), span_corruption (encoder_decoder). Fine-tuning on records
  # (data.corpus: a built-in task or JSONL files): 'sft' (decoder, encoder_decoder),
  # 'seq2seq' (encoder_decoder, decoder), 'classification' (encoder, decoder),
  # 'dpo' (decoder, encoder_decoder; needs init_from, the reference model).
  config.task = 'auto'
  masked_lm = config.masked_lm = ml_collections.ConfigDict()
  masked_lm.mask_rate = 0.15  # share of ordinary tokens chosen; of those 80% [MASK], 10% random, 10% kept
  masked_lm.whole_word = False  # choose whole words rather than single pieces
  masked_lm.next_sentence = False  # [CLS] A [SEP] B [SEP] pairs and a next-sentence head
  span_corruption = config.span_corruption = ml_collections.ConfigDict()
  span_corruption.noise_density = 0.15  # share of tokens dropped into spans
  span_corruption.mean_span_length = 3.0
  # task='classification' on {"text", "label"[, "text_pair"]} records (tasks/classification.py)
  classification = config.classification = ml_collections.ConfigDict()
  # The classes (strings or integers), in the order of the head's outputs; empty: the
  # training records' labels, sorted, filled in at start-up and saved in config.json
  classification.labels = []
  # Training records per label, aligned with labels (filled in at start-up when empty);
  # the most frequent label's share of eval records is eval_majority_baseline
  classification.label_counts = []
  # Encoder: classify [CLS] through BERT's dense + tanh pooler (a pre-trained one is reused);
  # False: the [CLS] hidden state itself. A decoder reads its last real token.
  classification.pooler = True
  seq2seq = config.seq2seq = ml_collections.ConfigDict()
  seq2seq.beam_size = 0  # eval decoding: 0 greedy, else beam search with this many beams
  # task='dpo' on {"prompt", "chosen", "rejected"} records (tasks/dpo.py)
  dpo = config.dpo = ml_collections.ConfigDict()
  dpo.beta = 0.1  # how far the policy may move from the reference: the rewards' scale
  dpo.disable_dropout = True  # the policy's log-probs without dropout (model's, LoRA's)
  dpo.sft_weight = 0.0  # > 0: adds this x the chosen answer's NLL per token to the loss (RPO)

  data = config.data = ml_collections.ConfigDict()
  data.corpus = 'web_bible'  # built-in name, or a path / glob of .txt, .jsonl, .parquet, or hf:NAME
  data.eval_corpus = ''  # same forms; empty: a fixed split of data.corpus
  data.eval_fraction = 0.02  # share of documents held out when eval_corpus is empty
  data.text_field = 'text'  # field holding the text in .jsonl / .parquet / hf datasets
  data.seq_len = 256
  data.batch_size = 16  # global, in sequences
  data.cache_dir = ''  # tokenizer + token cache; empty: <workdir's parent>/data_cache
  data.tokenizer = ml_collections.ConfigDict()
  data.tokenizer.type = 'bpe'  # 'bpe' | 'unigram'
  data.tokenizer.vocab_size = 4096
  data.tokenizer.byte_fallback = True
  data.tokenizer.max_train_bytes = 20_000_000  # text sampled to train the tokenizer

  train = config.train = ml_collections.ConfigDict()
  train.steps = 1000
  train.lr = 3e-4  # peak learning rate
  train.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio
  train.warmup_steps = 100
  train.b1 = 0.9
  train.b2 = 0.95
  train.weight_decay = 0.1  # decoupled (AdamW); never applied to norms and biases
  train.grad_clip = 1.0  # global-norm clip; 0 disables
  train.grad_accum = 1  # micro-batches per step; data.batch_size is split among them
  train.max_loss = 0.0  # stop (TrainingDiverged) when a logged loss exceeds this; 0: only NaN/inf
  train.offload_optimizer = False  # keep AdamW's moments in host memory (frees 8 bytes/param)
  train.z_loss = 0.0  # weight of log(Z)^2, keeps the softmax normaliser near 1
  # Dynamic loss scaling, float16 runs only (train/loss_scale.py): the loss per token
  # position is multiplied by the scale; a step whose gradients overflow is skipped
  # and halves it; growth_interval finite steps in a row multiply it by the factor.
  train.loss_scale_init = 2.0**15  # the first scale
  train.loss_scale_growth_interval = 2000  # finite steps in a row before it grows
  train.loss_scale_factor = 2.0  # it grows and shrinks by this factor
  train.loss_scale_min = 1.0  # a step skipped at this scale stops the run (TrainingDiverged)
  train.log_every = 10
  train.eval_every = 200
  train.eval_steps = 20  # at most this many validation batches, never more than one pass
  # Record tasks that decode at eval (seq2seq: chrF, BLEU) decode this many validation
  # records, the first ones in order (0: none)
  train.eval_decode_examples = 64
  train.checkpoint_every = 200
  train.keep_checkpoints = 3

  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all remaining devices
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.num_slices = 1  # >1: TPU slices / GPU hosts on the data-centre network; `data` spans them
  return config
