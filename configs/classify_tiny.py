"""A tiny BERT classifier: the built-in bible_genre records (a verse -> one of its book's 8
genres), trained from scratch on a laptop CPU in a few minutes.

python main.py --config=configs/classify_tiny.py --workdir=runs/classify_tiny
python main.py --mode=predict --workdir=runs/classify_tiny --input=verses.jsonl
"""
from configs import bert_tiny


def get_config():
  config = bert_tiny.get_config()
  config.task = 'classification'
  config.data.update(corpus='bible_genre', seq_len=64, batch_size=32)  # 97% of verses fit 64
  # The body is bert_tiny's (max_len included), so init_from a bert_tiny run loads it whole.
  config.model.dropout = 0.1
  # eval_steps x batch_size covers the 700 held-out verses in one pass
  config.train.update(steps=400, lr=5e-4, warmup_steps=50, log_every=25, eval_every=100,
                      eval_steps=25, checkpoint_every=100)
  return config
