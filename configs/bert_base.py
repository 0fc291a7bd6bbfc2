"""BERT-base: 12 layers, 12 heads, d_model 768, d_ff 3072, 512 positions (~110M parameters
with a 30k vocabulary), masked LM with next-sentence prediction. For a GPU or TPU.

python main.py --config=configs/bert_base.py --workdir=runs/bert_base
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(arch='encoder', num_layers=12, num_heads=12, d_model=768, d_ff=3072,
                      max_len=512, position='learned', norm='layernorm', activation='gelu_tanh',
                      use_bias=True, num_token_types=2, dropout=0.1)
  config.masked_lm.next_sentence = True
  config.data.update(seq_len=128, batch_size=256)
  config.data.tokenizer.vocab_size = 30_720
  config.train.update(steps=100_000, lr=1e-4, warmup_steps=10_000, weight_decay=0.01,
                      log_every=100, eval_every=2000, eval_steps=50, checkpoint_every=2000)
  return config
