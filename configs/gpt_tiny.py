"""A small GPT that trains on a 2-core laptop CPU in about 10 minutes.

python main.py --config=configs/gpt_tiny.py --workdir=runs/gpt_tiny
"""
from configs import default


def get_config():
  config = default.get_config()
  # Llama's block (RMSNorm, RoPE, SwiGLU), so a run exports as LlamaForCausalLM; d_ff is
  # 2/3 of 4 d_model (rounded to 16), keeping the MLP's parameters those of a 4x GELU MLP.
  config.model.update(num_layers=4, num_heads=4, d_model=256, d_ff=688, max_len=256,
                      activation='silu', gated_mlp=True)
  config.data.update(seq_len=128, batch_size=16)
  config.data.tokenizer.vocab_size = 4096
  config.train.update(steps=600, lr=1e-3, warmup_steps=60, log_every=25, eval_every=100,
                      eval_steps=20, checkpoint_every=100)
  # Unrolled layers run faster than nn.scan on a CPU at this depth (benchmarks/RESULTS.md
  # has the figures); compile time is small either way.
  config.model.scan_layers = False
  return config
