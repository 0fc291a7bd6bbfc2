"""A PyTorch reference of the decoder-only model for benchmarks/train_step.py --compare=torch.

nanoGPT's GPT in eager float32: learned positions, pre-LayerNorm blocks (eps and biases
as the ModelConfig says), attention through F.scaled_dot_product_attention(is_causal=True),
a tanh-GELU MLP, a final LayerNorm and the output projection tied to the token embedding
(or a separate one); trained with torch.optim.AdamW (decay on matrices only, as
train/optimizer.py) and global-norm clipping. Parameters are named as GPT-2's in
`transformers`, so `load_params` copies ours in through interop's GPT-2 layout, and the
reference computes our model's loss (tests/test_benchmarks.py checks loss and gradients).

`in_own_process` times it (and benchmarks/decode.py's `transformers` generate) in a
child process (`python -m benchmarks.torch_reference FILE`) that runs with 4 KB pages:
our commands restart themselves with glibc's malloc asking for huge pages
(train/runtime.py), which makes XLA's steps faster but PyTorch's slower
(benchmarks/RESULTS.md), so each is timed as it runs best.
"""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from interop import weights
from interop.families import gpt2, needs_problems
from models.config import ModelConfig
from models.layers import attention_scale
from train import runtime

# GPT-2's Conv1D weights are [in, out]; nn.Linear keeps [out, in].
_CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')


class Block(nn.Module):
  """x + attention(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    D, NK, F_ = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.d_ff
    self.heads, self.scale = cfg.num_heads, attention_scale(cfg)
    self.ln_1 = nn.LayerNorm(D, eps=cfg.norm_eps)
    self.attn = nn.Module()
    self.attn.c_attn = nn.Linear(D, 3 * NK, bias=cfg.use_bias)  # query, key, value
    self.attn.c_proj = nn.Linear(NK, D, bias=cfg.use_bias)
    self.ln_2 = nn.LayerNorm(D, eps=cfg.norm_eps)
    self.mlp = nn.Module()
    self.mlp.c_fc = nn.Linear(D, F_, bias=cfg.use_bias)
    self.mlp.c_proj = nn.Linear(F_, D, bias=cfg.use_bias)

  def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
    B, T, _ = x_BTD.shape
    q, k, v = self.attn.c_attn(self.ln_1(x_BTD)).chunk(3, dim=-1)
    q_BNTK, k_BNTK, v_BNTK = (y.view(B, T, self.heads, -1).transpose(1, 2) for y in (q, k, v))
    out_BNTK = F.scaled_dot_product_attention(q_BNTK, k_BNTK, v_BNTK, is_causal=True,
                                              scale=self.scale)
    x_BTD = x_BTD + self.attn.c_proj(out_BNTK.transpose(1, 2).reshape(B, T, -1))
    h_BTF = F.gelu(self.mlp.c_fc(self.ln_2(x_BTD)), approximate='tanh')
    return x_BTD + self.mlp.c_proj(h_BTF)


class GPT(nn.Module):
  """The decoder-only model; forward(ids, targets) -> mean token cross-entropy."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    problems = needs_problems(cfg, gpt2.EXPORT_NEEDS, 'the PyTorch reference')
    problems += gpt2.export_problems(cfg)
    if cfg.dropout:
      problems.append(f'model.dropout={cfg.dropout} (the reference has none)')
    if cfg.activation != 'gelu_tanh':
      problems.append(f"model.activation='{cfg.activation}' (the reference's MLP is GPT-2's "
                      "tanh GELU)")
    if jnp.dtype(cfg.dtype) != jnp.float32:
      problems.append(f'dtype {jnp.dtype(cfg.dtype).name} (the reference runs float32)')
    if problems:
      raise ValueError(f"The PyTorch reference cannot build this model: {'; '.join(problems)}.")
    self.cfg = cfg
    self.transformer = nn.Module()
    self.transformer.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
    self.transformer.wpe = nn.Embedding(cfg.max_len, cfg.d_model)
    self.transformer.h = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
    self.transformer.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
    if cfg.tie_embeddings:
      self.lm_head.weight = self.transformer.wte.weight

  def forward(self, ids_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    positions_T = torch.arange(ids_BT.shape[1], device=ids_BT.device)
    x_BTD = self.transformer.wte(ids_BT) + self.transformer.wpe(positions_T)
    for block in self.transformer.h:
      x_BTD = block(x_BTD)
    logits_BTV = self.lm_head(self.transformer.ln_f(x_BTD))
    return F.cross_entropy(logits_BTV.flatten(0, 1), targets_BT.flatten())


@torch.no_grad()
def load_params(model: GPT, params) -> GPT:
  """Our parameter tree (scanned or unrolled) copied into `model`. Zero biases that
  the export writes for a model without biases have no place here and must be zero."""
  cfg = model.cfg
  tensors = weights.to_hf(gpt2.layout(cfg), jax.device_get(params), cfg.scan_layers)
  own = dict(model.named_parameters())  # a tied lm_head is listed once, as wte
  for name, x in tensors.items():
    if name not in own:
      if np.any(x):
        raise ValueError(f'{name} has no place in the PyTorch reference.')
      continue
    x = x.T if name.endswith(_CONV1D) else x
    own.pop(name).copy_(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
  if own:
    raise ValueError(f'Parameters of the PyTorch reference left unset: {sorted(own)}.')
  return model


def make_optimizer(model: GPT, train) -> torch.optim.AdamW:
  """AdamW with train/optimizer.py's b1, b2 and weight decay (on matrices and embeddings,
  never on norms and biases) at the peak learning rate."""
  decay = [p for p in model.parameters() if p.dim() >= 2]
  other = [p for p in model.parameters() if p.dim() < 2]
  return torch.optim.AdamW([{'params': decay, 'weight_decay': train.weight_decay},
                            {'params': other, 'weight_decay': 0.0}],
                           lr=train.lr, betas=(train.b1, train.b2))


def measure(model: GPT, train, inputs_BT: np.ndarray, targets_BT: np.ndarray,
            steps: int) -> dict:
  """Tokens/s and seconds per step of `steps` training steps (after one warm-up) of
  `model` on one batch, on every core; the loss of its first step."""
  torch.set_num_threads(os.cpu_count())
  model.train()
  opt = make_optimizer(model, train)
  ids = torch.from_numpy(np.asarray(inputs_BT, np.int64))
  targets = torch.from_numpy(np.asarray(targets_BT, np.int64))

  def step() -> float:
    loss = model(ids, targets)
    loss.backward()
    if train.grad_clip > 0:
      nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()

  first_loss = step()  # warm-up
  start = time.perf_counter()
  for _ in range(steps):
    step()
  step_s = (time.perf_counter() - start) / steps
  return {'tokens_per_s': ids.numel() / step_s, 'step_s': step_s, 'first_loss': first_loss}


def measure_in_own_process(model: GPT, train, inputs_BT: np.ndarray, targets_BT: np.ndarray,
                           steps: int) -> dict:
  """`measure` of `model` (its weights as they are now) in a process of its own with 4 KB
  pages (`in_own_process`)."""
  train_fields = {k: getattr(train, k) for k in ('lr', 'b1', 'b2', 'weight_decay', 'grad_clip')}
  return in_own_process({'kind': 'train', 'cfg': dataclasses.asdict(model.cfg),
                         'train': train_fields, 'steps': steps, 'state': model.state_dict(),
                         'inputs': np.asarray(inputs_BT), 'targets': np.asarray(targets_BT)})


def in_own_process(job: dict) -> dict:
  """What `_JOBS[job['kind']]` returns for `job`, run in a new process whose glibc malloc
  does not ask for huge pages (GLIBC_TUNABLES glibc.malloc.hugetlb=0, the user's other
  tunables kept; 4 KB pages where the kernel's mode is 'madvise'), where PyTorch runs
  faster than with the huge pages our commands ask for."""
  env = {**os.environ, 'GLIBC_TUNABLES': runtime.tunables_with(os.environ, 0)}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, 'job.pt')
    torch.save(job, path)
    out = subprocess.run([sys.executable, '-m', 'benchmarks.torch_reference', path], cwd=root,
                         env=env, capture_output=True, text=True, check=False)
  if out.returncode or not out.stdout.strip():
    raise RuntimeError(f'The PyTorch reference failed:\n{out.stderr[-2000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def _train_job(job: dict) -> dict:
  model = GPT(ModelConfig(**job['cfg']))
  model.load_state_dict(job['state'])
  return measure(model, types.SimpleNamespace(**job['train']), job['inputs'], job['targets'],
                 job['steps'])


def _generate_job(job: dict) -> dict:
  """{'tokens': new tokens [B, new_tokens], 'seconds': best of 3 after a warm-up} of
  transformers' greedy GPT2LMHeadModel.generate, eager, on every core."""
  import transformers
  from benchmarks import best_seconds
  torch.set_num_threads(os.cpu_count())
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**job['config'])).eval()
  missing, unexpected = model.load_state_dict(job['state'], strict=False)
  if unexpected or set(missing) - {'lm_head.weight'}:  # lm_head is tied to wte
    raise RuntimeError(f'GPT2LMHeadModel state mismatch: missing {missing}, '
                       f'unexpected {unexpected}.')
  input_ids = torch.from_numpy(np.asarray(job['ids'], np.int64))

  def run():
    with torch.inference_mode():
      return model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                            max_new_tokens=job['new_tokens'], do_sample=False)
  tokens = run()  # warm-up
  seconds = best_seconds({'hf': run}, warm_up=False)[0]['hf']
  return {'tokens': tokens[:, input_ids.shape[1]:].tolist(), 'seconds': seconds}


_JOBS = {'train': _train_job, 'generate': _generate_job}


if __name__ == '__main__':
  job = torch.load(sys.argv[1], weights_only=False)
  print(json.dumps(_JOBS[job['kind']](job)), flush=True)
