"""GPT-2 small: 12 layers, 12 heads, d_model 768, context 1024; ~111M parameters with its
32,768-piece tokenizer (GPT-2's 124M counts a 50,257-row embedding). The embedding has
as many rows as the tokenizer has pieces, rounded up to a multiple of 128
(model.vocab_size=0): rows no token uses would inflate the parameter count and MFU.

Meant for a GPU or TPU (bfloat16 there); it also starts on a CPU.
python main.py --config=configs/gpt_small.py --workdir=runs/gpt_small
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(num_layers=12, num_heads=12, d_model=768, d_ff=3072, max_len=1024,
                      position='learned', norm='layernorm', activation='gelu_tanh', use_bias=True)
  config.data.update(seq_len=1024, batch_size=32)
  config.data.tokenizer.vocab_size = 32768
  config.train.update(steps=20_000, lr=6e-4, warmup_steps=700, weight_decay=0.1,
                      log_every=50, eval_every=1000, eval_steps=50, checkpoint_every=1000)
  return config
