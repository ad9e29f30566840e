"""
Chat rendering: a conversation through the checkpoint's own chat template, as transformers' apply_chat_template
renders it, with the assistant-only loss mask of SFT.

    ids, mask = render_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])

SFT trains on conversations rendered by the checkpoint's own chat template (tokenizer_config.json's chat_template or
chat_template.jinja) in the sandboxed Jinja environment of transformers' apply_chat_template, so the ids are
apply_chat_template(messages, tokenize=True)'s and the fine-tuned model speaks the format it will be prompted in.
The rendered text is tokenised as HF does it: each added token (special or not) in it becomes its id, and the text
between two of them is one encode(), so BPE merges across "role\n" + content as in the reference.

The loss mask (nanochat's render_conversation) is true from the start of each assistant message's content to the
control token that ends its turn (<|im_end|>, <|eot_id|>, Mistral's </s>), both included: the model learns to answer
and to stop, never to imitate the user or the system prompt. A token that straddles the start of the content (BPE
merged "\n" + "\nYes") is trained, as transformers' assistant mask trains every token that overlaps the content.
Where a content starts is found by rendering it once more behind a marker, a Unicode noncharacter no text holds;
the rendering without the markers must be the plain one. A template that trims the content (Llama-3's `| trim`)
gets the marker after the leading whitespace instead; one that rewrites it in other ways is refused.

A checkpoint without a template (a base model: Gemma-3-270M, most base Mistral and Llama checkpoints, any model
trained from scratch) is given one with --chat-template FILE (use_chat_template; samples in data/chat_templates/), which
may also replace a checkpoint's own; the model a command exports carries it in tokenizer_config.json.

Content that spells a control token ("<|im_start|>") is refused: HF would read it as that token, a conversation
could forge turns, and encoding it as plain text would give ids apply_chat_template does not.
"""
import functools
import hashlib
import itertools
import json
import os
import re
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant")
MARK = "\ufdd0"  # where an assistant message's content starts, in a marked rendering
SAMPLE_TEMPLATES = "data/chat_templates"  # our sample --chat-template files (Gemma-style turns, ChatML)


class _TemplateRefusal(jinja2.TemplateError):
    """What a template's raise_exception(message) raises."""


def _raise_exception(message):
    raise _TemplateRefusal(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    """The template global transformers defines (Llama-3.2 writes today's date with it): the local time now."""
    return datetime.now().strftime(format)


class _Generation(jinja2.ext.Extension):
    """transformers' {% generation %}...{% endgeneration %} tag (its assistant-mask marker): renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=16)
def _compile(template):
    """transformers' chat-template environment: sandboxed and immutable, trim_blocks and lstrip_blocks, loop controls,
    a tojson that does not escape HTML, raise_exception and strftime_now."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=strftime_now)
    return env.from_string(template)


# Items that a template's range() calls may make in one rendering, all together: templates loop over the messages,
# rarely over a range; nested range(100000) loops would run for hours with growing memory.
MAX_RANGE_ITEMS = 10**6


def _bounded_range(budget):
    """range() for one rendering, refusing once the renderings' ranges together pass the budget."""
    def bounded(*args):
        r = range(*args)
        budget[0] -= len(r)
        if budget[0] < 0:
            raise jinja2.TemplateError(f"its range() loops run past {MAX_RANGE_ITEMS:,} items")
        return r
    return bounded


def template_file(tokenizer):
    """The file the chat template came from, to name in errors: the --chat-template FILE that replaced the
    checkpoint's (use_chat_template), else chat_template.jinja where there is one (it wins, as in transformers),
    else tokenizer_config.json."""
    if getattr(tokenizer, "chat_template_file", None):  # set by use_chat_template
        return tokenizer.chat_template_file
    if tokenizer.source is None:
        return "this tokenizer's chat template"
    jinja = os.path.join(tokenizer.source, "chat_template.jinja")
    return jinja if os.path.isfile(jinja) else os.path.join(tokenizer.source, "tokenizer_config.json")


def no_template(where):
    """The error for a checkpoint without a chat template (a base model): it names the flag that supplies one."""
    return (f"{where}: no chat_template (tokenizer_config.json or chat_template.jinja): pass --chat-template FILE "
            f"(a Jinja chat template, e.g. {SAMPLE_TEMPLATES}/gemma.jinja)")


def _render(tokenizer, messages, add_generation_prompt):
    """The template's text for these messages, with the variables apply_chat_template passes."""
    where = template_file(tokenizer)
    if not tokenizer.chat_template:
        raise ValueError(no_template(where))
    try:
        template = _compile(tokenizer.chat_template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where}: the chat_template is not valid Jinja (line {e.lineno}: {e.message})") from None
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]  # as transformers does
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                               documents=None, **tokenizer.special_tokens_map,
                               range=_bounded_range([MAX_RANGE_ITEMS]))
    except _TemplateRefusal as e:
        raise ValueError(f"{where}: the chat template refuses this conversation: {e.message}") from None
    except jinja2.TemplateError as e:  # e.g. UndefinedError: 'x' is undefined
        given = ", ".join(["messages", "add_generation_prompt", "tools=None", "documents=None",
                           *sorted(tokenizer.special_tokens_map)])
        raise ValueError(f"{where}: the chat template failed: {type(e).__name__}: {e} (it is given {given})") from None


def _control_tokens(tokenizer):
    """A regex matching the added tokens render_chat cuts out of the text, longest first at each position, as HF
    splits them: all of them but the plain (not special) ones that a SentencePiece-style tokenizer's encode cuts out
    itself (Gemma-3's runs of newlines and spaces, HTML tags: text an answer may hold, "\n\n" between paragraphs)."""
    plain = tokenizer.sp.cut if tokenizer.sp else {}
    tokens = sorted((t for t in tokenizer.special_tokens if t not in plain), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def _content_starts(tokenizer, messages, add_generation_prompt, text):
    """Where each assistant message's content starts in the rendered text (see the section's comment)."""
    n = sum(m["role"] == "assistant" for m in messages)
    if n == 0:
        return []
    for trimmed in (False, True):
        marked = []
        for m in messages:
            content = m["content"]
            if m["role"] == "assistant":  # the mark before the content, or after its leading whitespace
                start = len(content) - len(content.lstrip()) if trimmed else 0
                content = content[:start] + MARK + content[start:]
            marked.append({**m, "content": content})
        rendered = _render(tokenizer, marked, add_generation_prompt)
        if rendered.replace(MARK, "") == text and rendered.count(MARK) == n:
            return [i - k for k, i in enumerate(i for i, c in enumerate(rendered) if c == MARK)]
    raise ValueError(f"{template_file(tokenizer)}: the chat template rewrites the assistant messages' "
                     "content (not only trims it), so render_chat cannot tell which tokens are the answer")


PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]  # a template's shortest chat


def end_of_turn_id(tokenizer):
    """The token the chat template writes after an assistant message (<|im_end|>, <|eot_id|>, </s>): a chat model's
    stop token. None when the tokenizer has no template (or it renders no such token); a template that fails to
    render is an error naming its file, never taken for "no template"."""
    if not tokenizer.chat_template:
        return None
    ids, mask = render_chat(tokenizer, PROBE)
    last = max((i for i, m in enumerate(mask) if m), default=None)  # the end of the answer's span
    return ids[last] if last is not None and ids[last] in tokenizer.special_tokens.values() else None


def chat_end_of_turn(tokenizer):
    """end_of_turn_id for a command that cannot do without one (SFT): the id, or a ValueError naming the file and
    what is missing: a template (pass --chat-template), or one of the tokenizer's control tokens where the template
    ends an answer. A base model's tokenizer may lack ChatML's <|im_end|>: "<|im_end|>" is then plain text, several
    ordinary tokens, and the model could neither learn nor signal the end of its turn."""
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        return eot
    where = template_file(tokenizer)
    if not tokenizer.chat_template:
        raise ValueError(no_template(where))
    text = _render(tokenizer, PROBE, False)
    after = text[_content_starts(tokenizer, PROBE, False, text)[0] + len(PROBE[1]["content"]):]
    if not after.strip():
        raise ValueError(f"{where}: the chat template writes nothing that ends an answer ({after!r} after it): a chat "
                         "model needs a control token there (ChatML's <|im_end|>, Gemma's <end_of_turn>)")
    end = after.split()[0]
    raise ValueError(f"{where}: the chat template ends an answer with {end!r}, which is not one of the control "
                     f"tokens of {tokenizer.source or 'the tokenizer'} (tokenizer.json's added_tokens) but "
                     f"{len(tokenizer.encode(end))} ordinary tokens: write the turns with markers the tokenizer has "
                     "(Gemma-3's vocabulary has <start_of_turn> and <end_of_turn>)")


def check_messages(messages):
    """Raise ValueError saying what is wrong with a {"messages": [...]} conversation (the HF / OpenAI format)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected "messages": a non-empty list of {"role": ..., "content": ...}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string, got "
                             f"{type(m.get('content')).__name__}")


def render_chat(tokenizer, messages, add_generation_prompt=False):
    """Conversation -> (ids, mask): the ids of apply_chat_template(messages, tokenize=True, add_generation_prompt) for
    the tokenizer's own chat template, and the mask, true on each assistant message's content and the control token
    that ends its turn (see the section's comment)."""
    check_messages(messages)
    control = _control_tokens(tokenizer)
    for i, m in enumerate(messages):
        spelled = control.search(m["content"]) if control else None
        if spelled:
            raise ValueError(f"message {i} ({m['role']}): the content spells the control token {spelled.group()!r}; "
                             "render_chat refuses it (HF would read it as that token, not as text)")
        if MARK in m["content"]:
            raise ValueError(f"message {i} ({m['role']}): the content holds U+FDD0, render_chat's marker")
    text = _render(tokenizer, messages, add_generation_prompt)
    starts = _content_starts(tokenizer, messages, add_generation_prompt, text)

    ids, mask, pos, trained, found = [], [], 0, False, 0  # trained: in an answer, until the control token after it
    cuts = [(c.start(), c.end(), c.group()) for c in control.finditer(text)] if control else []
    for start, end, token in cuts + [(len(text), len(text), None)]:
        part = text[pos:start]  # the text between two control tokens: one encode, as HF does
        tokens = tokenizer.encode(part, at_start=pos == 0)
        first = 0 if trained else len(tokens)  # this part's first trained token
        begins = [s - pos for s in starts if pos <= s <= start]
        if len(begins) > 1:
            raise ValueError(f"{template_file(tokenizer)}: the chat template writes no control token "
                             "between two answers, so render_chat cannot tell where the first one ends")
        if begins:  # an answer starts here: train the tokens that end after its first byte
            before = sum(map(len, tokenizer.token_bytes(tokenizer.encode(part[:begins[0]], at_start=pos == 0))))
            ends = itertools.accumulate(map(len, tokenizer.token_bytes(tokens)))
            first, trained, found = next((i for i, e in enumerate(ends) if e > before), len(tokens)), True, found + 1
        ids += tokens
        mask += [i >= first for i in range(len(tokens))]
        if token is not None:
            if token in tokenizer.stripped_tokens:
                raise ValueError(f"{tokenizer.source}: added token {token!r} has lstrip, rstrip or single_word set "
                                 "in tokenizer.json; HF then moves the text around it, which render_chat does not do")
            ids.append(tokenizer.special_tokens[token])
            mask.append(trained)
            trained = False
        pos = end
    if found < len(starts):  # the content and the template's text around it spell a control token together
        raise ValueError(f"{tokenizer.source or 'this tokenizer'}: an answer starts inside a control token")
    return ids, mask


# -----------------------------------------------------------------------------
# --chat-template FILE: a template for a checkpoint without one (a base model), or in place of its own


def add_chat_template_flag(p, renders="SFT's conversations", exports=True):
    """The --chat-template flag of every command that renders chats (sft.py, distill.py, eval.py, speculative.py);
    renders: what it renders there, and whether the command exports a model, for the help."""
    p.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template file, written as transformers' "
                   f"chat templates are (samples in {SAMPLE_TEMPLATES}/), for a checkpoint without one (a base model) "
                   f"or in place of its own: it renders {renders}" +
                   ("; the exported model carries it in tokenizer_config.json" if exports else ""))


def use_chat_template(tokenizer, path):
    """--chat-template FILE: from now on the tokenizer renders chats with FILE's template (render_chat,
    end_of_turn_id), and saves it (the export: save_pretrained) as tokenizer_config.json's chat_template, so
    transformers' apply_chat_template on the exported model gives the ids the model was trained on. The file must be
    UTF-8 Jinja that renders a conversation and ends the answer with a control token of the tokenizer, else a
    one-line ValueError naming it. Returns the template's sha256 (None without a file): a run records it in run.json
    so that --resume refuses another template."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            template = f.read()
    except OSError as e:
        raise ValueError(f"--chat-template {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--chat-template {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not template.strip():
        raise ValueError(f"--chat-template {path}: the file is empty")
    tokenizer.chat_template, tokenizer.chat_template_file = template, path
    if tokenizer.files:  # a tokenizer from a directory saves its files back as loaded: the new template goes into
        # them, as tokenizer_config.json's chat_template (every transformers version reads it), without the source's
        # chat_template.jinja (which would win over it)
        config = json.loads(tokenizer.files.get("tokenizer_config.json", b"{}"))
        config["chat_template"] = template
        tokenizer.files = {**{k: v for k, v in tokenizer.files.items() if k != "chat_template.jinja"},
                           "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode()}
    chat_end_of_turn(tokenizer)  # renders it: bad Jinja, a failing template or no end-of-turn token, named here
    return hashlib.sha256(template.encode("utf-8")).hexdigest()
