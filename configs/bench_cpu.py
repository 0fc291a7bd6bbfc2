"""The peer config used to compare training throughput with nanoGPT, nanodo and MaxText
on a 2-core CPU: vocab 8192, 6 layers, 6 heads, d_model 384, d_ff 1536, seq 256,
batch 16, float32.

python -m benchmarks.train_step --config=configs/bench_cpu.py --json
"""
from configs import default


def get_config():
  config = default.get_config()
  config.model.update(num_layers=6, num_heads=6, d_model=384, d_ff=1536, max_len=256,
                      vocab_size=8192, position='learned', norm='layernorm', activation='gelu_tanh')
  config.data.update(seq_len=256, batch_size=16)
  config.data.tokenizer.vocab_size = 8192
  # Unrolled layers run faster than nn.scan on a CPU at this depth (benchmarks/RESULTS.md
  # has the figures); compile time is small either way.
  config.model.scan_layers = False
  return config
