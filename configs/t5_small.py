"""T5-small: 6 encoder + 6 decoder layers, d_model 512, 8 heads, d_ff 2048, relative
position bias, span corruption (15% noise, mean span 3). For a GPU or TPU.

python main.py --config=configs/t5_small.py --workdir=runs/t5_small
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(arch='encoder_decoder', num_layers=6, num_heads=8, d_model=512,
                      d_ff=2048, max_len=512, position='relative', norm='rmsnorm', activation='gelu_tanh',
                      dropout=0.1)
  config.data.update(seq_len=512, batch_size=128)
  config.data.tokenizer.vocab_size = 32_000
  config.train.update(steps=100_000, lr=1e-3, warmup_steps=10_000, weight_decay=0.0,
                      log_every=100, eval_every=2000, eval_steps=50, checkpoint_every=2000)
  return config
