"""`python main.py --mode=predict --workdir=DIR --input=F.jsonl [--output=OUT.jsonl]`: a
classification run labels records.

Each input line is a JSON object with "text" (and optionally "text_pair"; a "label" is
allowed and kept). Each output line is that object plus "predicted" (a label as the
training data wrote it, string or integer) and "probabilities" ({label: p}). The output
goes to --output ('-': stdout), by default DIR/predictions/<input name>.jsonl; neither
the input nor an existing output is ever overwritten.
"""
import json
import os
import sys

from absl import flags, logging

_INPUT = flags.DEFINE_string('input', None, 'predict: JSONL records {"text"[, "text_pair"]} '
                             'to classify.')
_OUTPUT = flags.DEFINE_string('output', None, "predict: the JSONL to write ('-': stdout); "
                              'default WORKDIR/predictions/<input name>.jsonl.')
_BATCH_SIZE = flags.DEFINE_integer('predict_batch_size', 32, 'predict: records per batch.')


def read_records(path: str) -> list[dict]:
  """The input's records, each checked as a classification record whose label may be
  missing; ValueError (one line, naming the file and line) otherwise."""
  from input_pipeline import records as records_lib
  if not os.path.isfile(path):
    raise ValueError(f'--input={path} is not a file; give a .jsonl file of records '
                     '{"text": ...} (one JSON object per line).')
  records = records_lib.read_records(path, 'classification', labelled=False)
  if not records:
    raise ValueError(f'--input={path} holds no record; write one JSON object per line.')
  return records


def output_path(workdir: str, input_path: str, output: str | None) -> str | None:
  """Where predictions go (None: stdout); ValueError if that would overwrite a file."""
  if output == '-':
    return None
  if not output:
    name = os.path.splitext(os.path.basename(input_path))[0] + '.jsonl'
    output = os.path.join(workdir, 'predictions', name)
  if os.path.exists(output):
    same = os.path.samefile(output, input_path) if os.path.exists(input_path) else False
    raise ValueError(f'{output} {"is the input" if same else "already exists"}; predict never '
                     'overwrites a file: pass another --output (or move it away).')
  return output


def _write(lines: list[str], path: str) -> None:
  """Writes a new file whole (a temporary file linked into place: never a partial
  output, never over an existing file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.writelines(lines)
  try:
    os.link(tmp, path)  # fails if `path` appeared meanwhile
  except FileExistsError:
    raise ValueError(f'{path} already exists; predict never overwrites a file: pass another '
                     '--output.') from None
  finally:
    os.remove(tmp)


def predict(config, workdir: str) -> str | None:
  """Labels --input's records with the run's latest checkpoint; returns the output path
  (None: written to stdout)."""
  from inference.load import load_run
  if not _INPUT.value:
    raise ValueError('--mode=predict needs --input=F.jsonl (records {"text": ...}).')
  if _BATCH_SIZE.value < 1:
    raise ValueError(f'--predict_batch_size={_BATCH_SIZE.value} must be positive.')
  path = output_path(workdir, _INPUT.value, _OUTPUT.value)
  records = read_records(_INPUT.value)
  task, params, tokenizer = load_run(config, workdir)
  results = task.predict(params, tokenizer, records, _BATCH_SIZE.value)
  lines = [json.dumps(r, ensure_ascii=False) + '\n' for r in results]
  if path is None:
    sys.stdout.writelines(lines)
    sys.stdout.flush()
  else:
    _write(lines, path)
  labelled = [r for r in results if 'label' in r]
  accuracy = ''
  if labelled:
    correct = sum(r['predicted'] == r['label'] for r in labelled)
    accuracy = f'; accuracy {correct / len(labelled):.4f} on its {len(labelled)} labelled records'
  logging.info('Wrote %d predictions to %s%s.', len(results), path or 'stdout', accuracy)
  return path
