"""The chat template: conversations as token ids, with the loss on the assistant's turns.

A conversation is a list of messages {"role": "system"|"user"|"assistant", "content"}.
Each message becomes

    <|role|> content <|end|>

and a prompt for generation ends with `<|assistant|>`, so the model writes the answer
and closes it with `<|end|>` (where decoding stops). The markers are control tokens of
every tokenizer this project trains (input_pipeline/tokenizer.py); a tokenizer without
them (an imported GPT-2's, say) writes each role marker as its plain text and closes a
message with its eos token. Training weights the tokens of the assistant's
contents and the `<|end|>` (or eos) that closes them: the model learns to answer and to stop,
never to write the user's turns.

An imported checkpoint that ships its own template (Jinja, in its tokenizer files:
Llama-2-chat's [INST] ... [/INST], ChatML's <|im_start|> ...) is rendered with that
instead (even where the tokenizer has markers of these names, as Phi-3's does), so
fine-tuning and sampling speak the format the model was tuned on. The conversation is
rendered and tokenized whole; an answer's tokens are those that rendering through its
turn adds after rendering up to that turn with the generation prompt (the answer and
whatever closes it, e.g. '</s>'); answers stop at the first special token that closes
an answer.
"""
import dataclasses
import functools

from input_pipeline.tokenizer import CHAT_MARKERS, Tokenizer

ROLES = ('system', 'user', 'assistant')
_MARKER = dict(zip((*ROLES, 'end'), CHAT_MARKERS))


def messages_of(record: dict) -> list[dict]:
  """The conversation of an sft record: its messages, or prompt -> response."""
  if 'messages' in record:
    return record['messages']
  return [{'role': 'user', 'content': record['prompt']},
          {'role': 'assistant', 'content': record['response']}]


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
  """The template compiled as `transformers` compiles chat templates (a sandbox, loop
  controls, `raise_exception`, `strftime_now`, `tojson` keeping non-ASCII text)."""
  import datetime
  import json

  import jinja2  # only for checkpoints that ship a template
  from jinja2 import ext, sandbox

  def raise_exception(message):
    raise jinja2.TemplateError(message)
  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.filters['tojson'] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                  indent=indent)
  env.globals.update(raise_exception=raise_exception,
                     strftime_now=lambda f: datetime.datetime.now().strftime(f))
  return env.from_string(source)


@dataclasses.dataclass
class ChatTemplate:
  tokenizer: Tokenizer

  def __post_init__(self):
    t = self.tokenizer
    ids = {name: t.special_piece_id(marker) for name, marker in _MARKER.items()}
    self.uses_control_tokens = None not in ids.values()
    if self.uses_control_tokens:
      self.marker_ids = {name: [i] for name, i in ids.items()}
    else:  # roles as text; eos closes a message, so an answer stops at one token
      self.marker_ids = {name: t.encode(_MARKER[name]) for name in ROLES}
      self.marker_ids['end'] = [t.eos_id]
    self.start = [t.bos_id] if t.adds_bos else []
    self.jinja = t.chat_template  # a checkpoint's own template wins (module docstring)

  @functools.cached_property
  def stop_id(self) -> int:
    """The id where an answer ends: `<|end|>` (eos where the roles are text); with a
    checkpoint's template, the first special token after an answer (else eos)."""
    if not self.jinja:
      return self.marker_ids['end'][-1]
    ids, weights = self.render([{'role': 'user', 'content': 'a'},
                                {'role': 'assistant', 'content': 'b'}])
    special = set(self.tokenizer.special_ids)
    closing = [i for i, w in zip(ids, weights) if w and i in special]
    return closing[0] if closing else self.tokenizer.eos_id

  def answer_ids(self, content: str) -> list[int]:
    """An answer's tokens and what closes it (an encoder-decoder's target)."""
    return self.tokenizer.encode(content) + [self.stop_id]

  def _text(self, messages: list[dict], generation_prompt: bool) -> str:
    import jinja2
    t = self.tokenizer
    piece = lambda i: None if i is None else t.id_to_piece(i)
    try:
      return _compiled(self.jinja).render(
          messages=messages, add_generation_prompt=generation_prompt,
          bos_token=piece(t.bos_id), eos_token=piece(t.eos_id), pad_token=piece(t.pad_id),
          unk_token=piece(t.unk_id))
    except jinja2.TemplateError as e:
      raise ValueError(f"The checkpoint's chat template (beside {t.path}) cannot render this "
                       f"conversation ({' '.join(str(e).split())}); change the record's "
                       'messages to what the template accepts.') from None

  def _render_jinja(self, messages: list[dict]) -> tuple[list[int], list[float]]:
    """The whole rendering tokenized at once (as `transformers` does); an assistant turn's
    tokens are those its text adds to the rendering up to its generation prompt, found by
    tokenizing each such prefix (module docstring)."""
    boundaries = []  # (the rendering up to where a span ends, weight of the span)
    for i, message in enumerate(messages):
      if message['role'] == 'assistant':
        boundaries.append((self._text(messages[:i], generation_prompt=True), 0.0))
      boundaries.append((self._text(messages[:i + 1], generation_prompt=False),
                         float(message['role'] == 'assistant')))
    text = self._text(messages, generation_prompt=False)
    ids = self.tokenizer.encode_with_special(text)
    weights, done = [], 0
    for partial, weight in boundaries:
      prefix = self.tokenizer.encode_with_special(partial)
      if not text.startswith(partial) or prefix != ids[:len(prefix)] or len(prefix) < done:
        raise ValueError("The checkpoint's chat template renders a conversation so that a "
                         "turn's tokens do not start where the turn's text starts; its answers "
                         'cannot be located for the loss.')
      weights += [weight] * (len(prefix) - done)
      done = len(prefix)
    return ids, weights + [0.0] * (len(ids) - done)

  def render(self, messages: list[dict]) -> tuple[list[int], list[float]]:
    """(ids, weights): the conversation, weight 1 on each assistant content token and
    its closing marker, 0 elsewhere."""
    if self.jinja:
      return self._render_jinja(messages)
    ids, weights = list(self.start), [0.0] * len(self.start)
    for message in messages:
      role = message['role']
      head = self.marker_ids[role]
      body = self.tokenizer.encode(message['content']) + self.marker_ids['end']
      ids += head + body
      weights += [0.0] * len(head) + [float(role == 'assistant')] * len(body)
    return ids, weights

  def prompt(self, messages: list[dict]) -> list[int]:
    """The conversation so far, then the assistant's marker: what generation continues."""
    if self.jinja:
      return self.tokenizer.encode_with_special(self._text(messages, generation_prompt=True))
    return self.render(messages)[0] + self.marker_ids['assistant']

  def parse(self, ids: list[int]) -> list[dict]:
    """The messages of rendered ids (the inverse of `render` for contents that do not
    themselves contain a marker's tokens)."""
    if self.jinja:
      raise ValueError("parse reads this project's template, not a checkpoint's own.")
    ids = list(ids)[len(self.start):]
    starts = {tuple(self.marker_ids[role]): role for role in ROLES}
    end = self.marker_ids['end']
    messages, i = [], 0
    while i < len(ids):
      role = next((r for m, r in starts.items() if ids[i:i + len(m)] == list(m)), None)
      if role is None:
        raise ValueError(f'Token {i} of the conversation does not start a message.')
      i += len(self.marker_ids[role])
      j = i
      while j < len(ids) and ids[j:j + len(end)] != end:
        j += 1
      messages.append({'role': role, 'content': self.tokenizer.decode(ids[i:j])})
      i = j + len(end)
    return messages
