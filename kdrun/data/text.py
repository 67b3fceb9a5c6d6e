"""Text data for language models: tokenizers, corpora packed into blocks, prompt/response sets.

Every source returns :class:`~kdrun.data.tensors.TensorSplits` with these fields, each (N, L):

- ``input_ids``: the tokens the models read; ``attention_mask``: 1 on tokens, 0 on padding (right padding);
- ``labels``: the next token of each position, already shifted (position t is scored against
  ``labels[t]``; no loss shifts again), ``-100`` where nothing is scored;
- ``token_mask``: ``labels != -100`` -- what every token loss and the perplexity read.

The test split is held out before anything is tokenised (whole documents or whole examples).

``teacher_tokenizer`` (every source; optional): the teacher's own tokenizer, checked at build time to have the
student's vocabulary, token for token (models of one family can differ by added tokens); a difference is refused
with one message. The teacher then reads the student's token ids.

Tokenizers: ``tokenizer`` is a path or hub name (``AutoTokenizer``, e.g. the teacher's directory), or
``{train: {corpus: pydoc_topics, vocab_size: 1024}}`` -- a byte-level BPE trained with the ``tokenizers``
library on the corpus at build time and cached under ``~/.cache/kdrun/tokenizers`` (no download).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdrun.data.tensors import TensorSplits
from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")

IGNORE_INDEX = -100
PAD, EOS = "<pad>", "<eos>"
DEFAULT_PROMPT_FORMAT = "{prompt}\n"


# ----------------------------------------------------------------------------------------- corpora
def pydoc_topics() -> list[str]:
    """Python's own help topics (``pydoc_data.topics``): 79 documents, ~465k characters of English
    technical prose, shipped with every CPython -- a corpus that needs no download."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise KdrunError("this Python has no pydoc_data module (the corpus 'pydoc_topics'); give data.source.text=<file>") from None
    return [topics[k] for k in sorted(topics)]


def read_documents(source: str | Sequence[str], field: str = "text") -> list[str]:
    """Documents from ``pydoc_topics``, a ``.txt`` file (one document, blank-line separated paragraphs kept),
    a ``.jsonl`` / ``.json`` / ``.parquet`` file or a ``datasets`` directory (column ``field``), or a list of these."""
    if not isinstance(source, str):
        return [d for s in source for d in read_documents(s, field)]
    if source == "pydoc_topics":
        return pydoc_topics()
    if source.startswith("pydoc_topics@"):  # pydoc_topics@i/k: the topics i, i + k, i + 2k, ... (a share, as a domain)
        try:
            i, k = (int(x) for x in source.split("@", 1)[1].split("/"))
        except ValueError:
            raise KdrunError(f"data.source: '{source}' must read pydoc_topics@i/k, e.g. pydoc_topics@0/3") from None
        if not 0 <= i < k:
            raise KdrunError(f"data.source: '{source}': need 0 <= i < k")
        return pydoc_topics()[i::k]
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise KdrunError(f"data.source: no text file '{source}'")
        return [path.read_text(encoding="utf-8")]
    return [str(r[field]) for r in read_records(source, [field], "data.source")]


def read_records(source: str, fields: Sequence[str], key: str) -> list[dict[str, Any]]:
    """Rows of a local ``.jsonl`` / ``.json`` / ``.parquet`` file or of a ``datasets`` directory
    (``save_to_disk``), checked to have ``fields``."""
    path = Path(source).expanduser()
    if not path.exists():
        raise KdrunError(f"{key}: no file or directory '{source}'. Give a local .jsonl/.json/.parquet file or a directory "
                         f"written by datasets' save_to_disk (data sets are not downloaded here)")
    if path.is_dir():
        try:
            import datasets
        except ImportError:
            raise KdrunError(f"{key}: reading a datasets directory needs the 'datasets' package: pip install -e \".[text]\"") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as ex:  # noqa: BLE001 - any failure to read it is the same user error
            raise KdrunError(f"{key}: '{source}' is not a datasets directory ({ex})") from None
        if isinstance(ds, datasets.DatasetDict):
            raise KdrunError(f"{key}: '{source}' holds several splits {list(ds)}; point at one split's directory")
        rows = list(ds)
    elif path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as ex:
                        raise KdrunError(f"{key}: {source} line {i} is not JSON ({ex.msg})") from None
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise KdrunError(f"{key}: {source} must hold a JSON list of records")
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise KdrunError(f"{key}: reading parquet needs pyarrow (installed with datasets): pip install -e \".[text]\"") from None
        rows = pq.read_table(str(path)).to_pylist()
    else:
        raise KdrunError(f"{key}: '{source}' has an unknown format; use .jsonl, .json, .parquet, .txt or a datasets directory")
    if not rows:
        raise KdrunError(f"{key}: '{source}' holds no records")
    missing = [f for f in fields if f not in rows[0]]
    if missing:
        raise KdrunError(f"{key}: the records of '{source}' have no field {missing} (they have {sorted(rows[0])}); "
                         f"name the fields with data.source.prompt_field / response_field / text_field")
    return rows


# -------------------------------------------------------------------------------------- tokenizers
def _cache_root() -> Path:
    return Path(os.environ.get("KDRUN_CACHE", "~/.cache/kdrun")).expanduser() / "tokenizers"


def train_tokenizer(corpus: str | Sequence[str] = "pydoc_topics", vocab_size: int = 1024,
                    cache_dir: str | None = None) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style: any text encodes) with ``<pad>`` (id 0) and ``<eos>``
    (id 1), trained on ``corpus`` to ``vocab_size`` entries and cached by (corpus, size): the first
    build trains it (well under a second on ``pydoc_topics``), later builds load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if int(vocab_size) < 260:
        raise KdrunError(f"tokenizer.train.vocab_size must be at least 260 (256 bytes + specials), got {vocab_size}")
    documents = read_documents(corpus)
    digest = hashlib.sha256(json.dumps([str(corpus), int(vocab_size)]).encode() + "".join(documents).encode()).hexdigest()[:16]
    where = Path(cache_dir).expanduser() if cache_dir else _cache_root() / f"bpe{int(vocab_size)}-{digest}"
    if (where / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(str(where))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[PAD, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(documents, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
    tmp = where.with_name(where.name + f".tmp{os.getpid()}")
    fast.save_pretrained(str(tmp))
    try:
        tmp.rename(where)  # atomic: a concurrent build either sees the whole directory or trains its own
    except OSError:
        pass
    log.info("trained a %d-token byte-level BPE tokenizer on %s (cached in %s)", vocab_size, corpus, where)
    return PreTrainedTokenizerFast.from_pretrained(str(where if where.is_dir() else tmp))


def load_tokenizer(spec: Any, key: str = "data.source.tokenizer") -> Any:
    """A tokenizer from ``spec``: a path / hub name, ``{path: ...}``, or ``{train: {corpus, vocab_size}}``."""
    if isinstance(spec, Mapping) and "train" in spec:
        return train_tokenizer(**dict(spec["train"]))
    path = spec.get("path") if isinstance(spec, Mapping) else spec
    if not isinstance(path, str):
        raise KdrunError(f"{key}: give a path or hub name, or {{train: {{corpus: pydoc_topics, vocab_size: 1024}}}}; got {spec!r}")
    from transformers import AutoTokenizer

    from kdrun.models.hf import load_pretrained

    tok = load_pretrained(AutoTokenizer, path, key, what="the tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # GPT-2 and Llama ship no pad token; padding is masked everywhere anyway
    return tok


def check_same_vocabulary(student: Any, teacher: Any, key: str = "teacher.tokenizer") -> None:
    """Refuse two tokenizers whose vocabularies differ (token-level distillation reads one id space);
    the same family can differ by added tokens, so the tables are compared, not their sizes."""
    a, b = student.get_vocab(), teacher.get_vocab()
    if a == b:
        return
    only_s, only_t = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
    moved = sum(1 for t in set(a) & set(b) if a[t] != b[t])
    raise KdrunError(f"{key}: the teacher's tokenizer ({len(b)} tokens) and the student's ({len(a)}) differ "
                     f"(only the student's: {only_s}; only the teacher's: {only_t}; {moved} shared tokens with other ids). "
                     f"Token-level distillation needs one vocabulary: use a teacher of the student's family, or "
                     f"distil on teacher-generated text (sequence-level KD)")


# ------------------------------------------------------------------------------------------ fields
def _fields(rows: list[list[int]], targets: list[list[int]], length: int, pad_id: int) -> dict[str, Tensor]:
    n = len(rows)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((n, length), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):  # build time, once per example (not in the training step)
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        labels[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        attn[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "token_mask": labels != IGNORE_INDEX}


def _check_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise KdrunError(f"data.source.test_fraction must be in (0, 1), got {test_fraction}")


def _hold_out(items: list[Any], test_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, test): a seeded ``test_fraction`` of ``items`` (at least one) held out whole."""
    _check_fraction(test_fraction)
    perm = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, round(len(items) * test_fraction))
    return [items[i] for i in perm[n_test:]], [items[i] for i in perm[:n_test]]


def _split_documents(docs: list[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    if len(docs) < 2:  # one document: hold out its tail
        _check_fraction(test_fraction)
        text = docs[0]
        cut = int(len(text) * (1 - test_fraction))
        return [text[:cut]], [text[cut:]]
    return _hold_out(docs, test_fraction, seed)


def _record_splits(train: str, test: str | None, fields: list[str], test_fraction: float,
                   seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, test rows) from the files; without ``test``, a held-out part of ``train``."""
    rows = read_records(train, fields, "data.source.train")
    if test is None:
        return _hold_out(rows, test_fraction, seed)
    return rows, read_records(test, fields, "data.source.test")


def _check_padding(padding: str) -> None:
    if padding not in ("longest", "max_length"):
        raise KdrunError(f"data.source.padding must be longest or max_length, got '{padding}'")


def _pack(docs: list[str], tok: Any, seq_len: int, max_blocks: int | None) -> dict[str, Tensor]:
    eos = tok.eos_token_id
    stream: list[int] = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + ([eos] if eos is not None else []))
    tokens = torch.tensor(stream, dtype=torch.long)
    blocks = (tokens.numel() - 1) // seq_len
    if max_blocks is not None:
        blocks = min(blocks, int(max_blocks))
    if blocks < 1:
        raise KdrunError(f"data.source: the corpus gives {tokens.numel()} tokens, fewer than one block of seq_len={seq_len}")
    x = tokens[:blocks * seq_len].view(blocks, seq_len)
    y = tokens[1:blocks * seq_len + 1].view(blocks, seq_len)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y, "token_mask": torch.ones_like(x, dtype=torch.bool)}


def _with_teacher_tokenizer(tok: Any, teacher_tokenizer: Any) -> None:
    """Refuse a teacher tokenizer whose vocabulary differs from the student's (the teacher reads the student's ids)."""
    if teacher_tokenizer is not None:
        check_same_vocabulary(tok, load_tokenizer(teacher_tokenizer, "data.source.teacher_tokenizer"),
                              "data.source.teacher_tokenizer")


def text_corpus(tokenizer: Any, text: str | Sequence[str] = "pydoc_topics", seq_len: int = 128,
                test_fraction: float = 0.1, seed: int = 0, text_field: str = "text",
                max_train_blocks: int | None = None, max_test_blocks: int | None = None,
                teacher_tokenizer: Any = None, domains: Mapping[str, Any] | None = None,
                canaries: Sequence[Mapping[str, Any]] | None = None) -> TensorSplits:
    """Language-model data: documents held out whole for the test split (a seeded ``test_fraction`` of
    them), each split's documents tokenised, joined with ``<eos>`` and packed into blocks of ``seq_len``
    tokens (GPT-2 / nanoGPT style packing: every position is scored, no padding).

    ``domains: {name: source}`` (instead of ``text``): a corpus of several domains (DDK's setting), each source read,
    held out and packed on its own, so that every block belongs to one domain; the field ``domain`` (N,) holds its
    index, in the order given (``max_*_blocks`` apply per domain).

    ``canaries: [{text, repeats}]``: secrets inserted into the *training* documents ``repeats`` times each, at seeded
    places (Carlini et al., USENIX Security 2019), for ``kdrun-exposure`` to measure how much of them a model
    memorised."""
    tok = load_tokenizer(tokenizer)
    _with_teacher_tokenizer(tok, teacher_tokenizer)
    if domains:
        parts = {"train": [], "test": []}
        for d, (name, src) in enumerate(dict(domains).items()):
            train_d, test_d = _split_documents(read_documents(src, text_field), test_fraction, seed)
            for split, docs, cap in (("train", train_d, max_train_blocks), ("test", test_d, max_test_blocks)):
                f = _pack(docs, tok, seq_len, cap)
                f["domain"] = torch.full((f["input_ids"].shape[0],), d, dtype=torch.long)
                parts[split].append(f)
            log.info("data.source.domains: domain %d '%s': %d training and %d test blocks", d, name,
                     parts["train"][-1]["input_ids"].shape[0], parts["test"][-1]["input_ids"].shape[0])
        cat = {split: {k: torch.cat([f[k] for f in fs]) for k in fs[0]} for split, fs in parts.items()}
        return TensorSplits(cat["train"], cat["test"], tokenizer=tok)
    train_docs, test_docs = _split_documents(read_documents(text, text_field), test_fraction, seed)
    if canaries:
        train_docs = _with_canaries(train_docs, canaries, seed)
    return TensorSplits(_pack(train_docs, tok, seq_len, max_train_blocks), _pack(test_docs, tok, seq_len, max_test_blocks),
                        tokenizer=tok)


def _with_canaries(docs: list[str], canaries: Sequence[Mapping[str, Any]], seed: int) -> list[str]:
    """``docs`` with each canary's text inserted as ``repeats`` documents of its own, at seeded places."""
    out = list(docs)
    gen = torch.Generator().manual_seed(seed + 7)
    for c in canaries:
        if "text" not in c:
            raise KdrunError("data.source.canaries: every canary needs a text (and repeats, default 1)")
        for _ in range(int(c.get("repeats", 1))):
            out.insert(int(torch.randint(len(out) + 1, (), generator=gen)), str(c["text"]))
    return out


def format_prompt(tok: Any, prompt: str, chat_template: str | None, prompt_format: str) -> str:
    """The prompt as the model sees it: the model's chat template (``chat_template: model``, a user turn
    plus the assistant header) or ``prompt_format`` (default ``"{prompt}\\n"``)."""
    if chat_template == "model":
        if getattr(tok, "chat_template", None) is None:
            raise KdrunError("data.source.chat_template=model: the tokenizer has no chat template; set "
                             "data.source.chat_template=null to use data.source.prompt_format")
        return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt_format.format(prompt=prompt)


def _examples(rows: list[dict[str, Any]], tok: Any, prompt_field: str, response_field: str, max_length: int,
              chat_template: str | None, prompt_format: str, overflow: str,
              key: str) -> tuple[list[list[int]], list[list[int]], list[int], list[tuple[int, int]]]:
    """(inputs, targets, prompt lengths, kept): ``kept`` holds, per example kept, its row and how many tokens of
    ``response + <eos>`` it scores (fewer than all when the response was cut)."""
    prompts = [format_prompt(tok, str(r[prompt_field]), chat_template, prompt_format) for r in rows]
    p_ids = tok(prompts, add_special_tokens=chat_template != "model")["input_ids"]
    r_ids = tok([str(r[response_field]) for r in rows], add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    inputs, targets, prompt_lens, kept = [], [], [], []
    for i, (p, r) in enumerate(zip(p_ids, r_ids)):
        seq = p + r + eos
        if len(p) >= max_length:
            if overflow == "drop":
                continue
            raise KdrunError(f"{key}: example {i}'s prompt has {len(p)} tokens, not fewer than data.source.max_length="
                             f"{max_length}: raise max_length, or set data.source.overflow=drop to skip such examples")
        if len(seq) - 1 > max_length:
            if overflow == "error":
                raise KdrunError(f"{key}: example {i} has {len(seq) - 1} tokens, more than data.source.max_length={max_length}; "
                                 f"raise max_length, or set data.source.overflow=truncate (cut the response) or drop")
            if overflow == "drop":
                continue
            seq = seq[:max_length + 1]
        x, y = seq[:-1], seq[1:]
        # position t predicts y[t]; only response tokens (and the closing eos) are scored
        y = [IGNORE_INDEX if t < len(p) - 1 else tok_id for t, tok_id in enumerate(y)]
        inputs.append(x)
        targets.append(y)
        prompt_lens.append(len(p))
        kept.append((i, len(seq) - len(p)))
    if not inputs:
        raise KdrunError(f"{key}: no example fits data.source.max_length={max_length}")
    return inputs, targets, prompt_lens, kept


def _teacher_view(rows: list[dict[str, Any]], kept: list[tuple[int, int]], prompt_lens: list[int], width: int, tok: Any,
                  teacher_tok: Any, prompt_field: str, response_field: str, chat_template: str | None, prompt_format: str,
                  alignment: str, stats: Any) -> dict[str, Tensor]:
    """The teacher's own tokenisation of the examples the student kept (its chat template, its EOS; the response
    cut where the student's was cut), and the alignment fields (:mod:`kdrun.data.alignment`)."""
    from kdrun.data.alignment import position_groups, span_groups

    responses = [str(rows[i][response_field]) for i, _ in kept]
    s_enc = tok(responses, add_special_tokens=False, return_offsets_mapping=True)
    prompts = [format_prompt(teacher_tok, str(rows[i][prompt_field]), chat_template, prompt_format) for i, _ in kept]
    t_prompts = teacher_tok(prompts, add_special_tokens=chat_template != "model")["input_ids"]
    s_eos, t_eos = tok.eos_token_id, teacher_tok.eos_token_id
    t_inputs, t_targets, s_span, t_span = [], [], [], []
    for k, ((_, n), text) in enumerate(zip(kept, responses)):
        s_ids, s_off = s_enc["input_ids"][k], s_enc["offset_mapping"][k]
        n_r = min(n, len(s_ids))  # response tokens the student scores; the one after them (if any) is its EOS
        with_eos = s_eos is not None and n == len(s_ids) + 1
        if n_r < len(s_ids):  # the student's response was cut: the teacher reads the same characters
            text = text[:s_off[n_r - 1][1]] if n_r > 0 else ""
        t_enc = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True)
        t_ids = list(t_enc["input_ids"])
        if alignment == "spans":
            sg, tg = span_groups([e for _, e in s_off[:n_r]], [e for _, e in t_enc["offset_mapping"]])
        else:
            sg, tg = position_groups(n_r, len(t_ids))
        if with_eos:  # EOS predicts the end on both sides: its own span when the teacher has one
            last = max([g for g in sg if g >= 0], default=-1) + 1
            sg.append(last if t_eos is not None else -1)
            if t_eos is not None:
                t_ids.append(t_eos)
                tg.append(last)
        stats.add(sg, tg)
        p = t_prompts[k]
        seq = p + t_ids
        t_inputs.append(seq[:-1])
        t_targets.append([IGNORE_INDEX if t < len(p) - 1 else v for t, v in enumerate(seq[1:])])
        s_span.append([-1] * (prompt_lens[k] - 1) + sg)
        t_span.append([-1] * (len(p) - 1) + tg)
    t_width = max(len(x) for x in t_inputs)
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
    f = {f"teacher_{k}": v for k, v in _fields(t_inputs, t_targets, t_width, pad).items()}
    f["teacher_prompt_length"] = torch.tensor([len(p) for p in t_prompts], dtype=torch.long)  # rollouts' teacher prompts
    span = torch.full((len(kept), width), -1, dtype=torch.long)
    t_span_t = torch.full((len(kept), t_width), -1, dtype=torch.long)
    for k, (a, b) in enumerate(zip(s_span, t_span)):  # build time, once per example
        span[k, :len(a)] = torch.tensor(a, dtype=torch.long)
        t_span_t[k, :len(b)] = torch.tensor(b, dtype=torch.long)
    prev = torch.cat([torch.full((len(kept), 1), -1, dtype=torch.long), span[:, :-1]], dim=1)
    f.update(span=span, teacher_span=t_span_t, span_mask=(span >= 0) & (span != prev))
    return f


def _teacher_tokenizer(tok: Any, teacher_tokenizer: Any, alignment: str) -> Any:
    """The teacher's tokenizer when it tokenises on its own (``alignment`` spans / positions), else None (after
    checking an identical vocabulary)."""
    from kdrun.data.alignment import ALIGNMENTS

    if alignment not in ALIGNMENTS:
        raise KdrunError(f"data.source.alignment must be one of {', '.join(ALIGNMENTS)}, got '{alignment}'")
    if alignment == "identical":
        _with_teacher_tokenizer(tok, teacher_tokenizer)
        return None
    if teacher_tokenizer is None:
        raise KdrunError(f"data.source.alignment={alignment}: the teacher tokenises the text itself, so give its tokenizer "
                         f"(data.source.teacher_tokenizer=<teacher dir>)")
    return load_tokenizer(teacher_tokenizer, "data.source.teacher_tokenizer")


def instructions(tokenizer: Any, train: str, test: str | None = None, prompt_field: str = "prompt",
                 response_field: str = "response", max_length: int = 512, chat_template: str | None = None,
                 prompt_format: str = DEFAULT_PROMPT_FORMAT, overflow: str = "truncate", padding: str = "longest",
                 test_fraction: float = 0.1, seed: int = 0, max_examples: int | None = None,
                 teacher_tokenizer: Any = None, alignment: str = "identical") -> TensorSplits:
    """Prompt/response examples (local files, :func:`read_records`): the loss is on response tokens only.

    Each example is ``prompt_tokens + response_tokens + <eos>``, the prompt formatted by the model's chat
    template (``chat_template: model``) or ``prompt_format``. ``overflow`` for an example longer than
    ``max_length``: ``truncate`` (cut the response; default), ``drop`` or ``error``; a prompt that alone
    does not fit is an error unless ``drop``. ``padding``: ``longest`` (default: each batch is cut to its
    longest example) or ``max_length`` (static shapes, for ``torch.compile``). ``test`` absent: a seeded
    ``test_fraction`` of ``train`` is held out. Extra fields ``prompt_length`` (N,) serves generation (the
    prompt is ``input_ids[:prompt_length]``, the reference the scored tokens) and ROUGE-L.
    """
    if overflow not in ("truncate", "drop", "error"):
        raise KdrunError(f"data.source.overflow must be truncate, drop or error, got '{overflow}'")
    _check_padding(padding)
    tok = load_tokenizer(tokenizer)
    teacher_tok = _teacher_tokenizer(tok, teacher_tokenizer, alignment)
    rows, test_rows = _record_splits(train, test, [prompt_field, response_field], test_fraction, seed)
    if max_examples is not None:
        rows = rows[:int(max_examples)]
    out = {}
    for split, split_rows in (("train", rows), ("test", test_rows)):
        x, y, plen, kept = _examples(split_rows, tok, prompt_field, response_field, max_length, chat_template,
                                     prompt_format, overflow, f"data.source.{split}")
        f = _fields(x, y, max_length, tok.pad_token_id)
        f["prompt_length"] = torch.tensor(plen, dtype=torch.long)
        if teacher_tok is not None:
            from kdrun.data.alignment import SpanStats, tokenizer_map

            stats = SpanStats()
            f.update(_teacher_view(split_rows, kept, plen, max_length, tok, teacher_tok, prompt_field, response_field,
                                   chat_template, prompt_format, alignment, stats))
            log.info("alignment=%s, %s split: %s", alignment, split, stats.summary())
            if split == "train":
                log.info("vocabularies: %s", tokenizer_map(tok, teacher_tok).summary())
        out[split] = f
    return TensorSplits(out["train"], out["test"], trim_field="attention_mask" if padding == "longest" else None,
                        tokenizer=tok, teacher_tokenizer=teacher_tok, alignment=alignment)


def preference_pairs(tokenizer: Any, train: str, test: str | None = None, prompt_field: str = "prompt",
                     chosen_field: str = "chosen", rejected_field: str = "rejected", max_length: int = 512,
                     chat_template: str | None = None, prompt_format: str = DEFAULT_PROMPT_FORMAT, overflow: str = "truncate",
                     padding: str = "longest", test_fraction: float = 0.1, seed: int = 0, max_examples: int | None = None,
                     teacher_tokenizer: Any = None) -> TensorSplits:
    """Preference pairs (a prompt, a chosen and a rejected response; DPO's data, REDI's positive and negative
    traces) from local files: each pair is two rows of :func:`instructions`' fields, the chosen one first, kept
    together by every loader (shuffled, batched and shared among ranks as one). Extra fields: ``chosen`` (N,) bool,
    which row of its pair a row is, ``chosen_token_mask`` (N, L), ``token_mask`` on chosen rows only (the
    cross-entropy of SFT on the positives, the perplexity evaluation), and ``rejected_token_mask``. A pair is dropped (``overflow: drop``) when
    either response is. ``data.batch_size`` counts rows: two per pair."""
    if overflow not in ("truncate", "drop", "error"):
        raise KdrunError(f"data.source.overflow must be truncate, drop or error, got '{overflow}'")
    _check_padding(padding)
    tok = load_tokenizer(tokenizer)
    _with_teacher_tokenizer(tok, teacher_tokenizer)
    rows, test_rows = _record_splits(train, test, [prompt_field, chosen_field, rejected_field], test_fraction, seed)
    if max_examples is not None:
        rows = rows[:int(max_examples)]
    out = {}
    for split, split_rows in (("train", rows), ("test", test_rows)):
        key = f"data.source.{split}"
        sides = [_examples(split_rows, tok, prompt_field, field, max_length, chat_template, prompt_format, overflow, key)
                 for field in (chosen_field, rejected_field)]
        at = [{row: j for j, (row, _) in enumerate(side[3])} for side in sides]
        both = [row for row in at[0] if row in at[1]]
        if not both:
            raise KdrunError(f"{key}: no pair fits data.source.max_length={max_length}")
        x, y, plen = [], [], []
        for row in both:  # build time, once per pair: chosen row, then rejected row
            for side, where in zip(sides, at):
                j = where[row]
                x.append(side[0][j])
                y.append(side[1][j])
                plen.append(side[2][j])
        f = _fields(x, y, max_length, tok.pad_token_id)
        f["prompt_length"] = torch.tensor(plen, dtype=torch.long)
        f["chosen"] = (torch.arange(len(x)) % 2) == 0
        f["chosen_token_mask"] = f["token_mask"] & f["chosen"].view(-1, 1)
        f["rejected_token_mask"] = f["token_mask"] & ~f["chosen"].view(-1, 1)
        out[split] = f
    return TensorSplits(out["train"], out["test"], trim_field="attention_mask" if padding == "longest" else None,
                        tokenizer=tok, group=2)


def ranking_pairs(tokenizer: Any, train: str, test: str | None = None, query_field: str = "query",
                  positive_field: str = "positive", negative_field: str = "negative",
                  score_fields: Sequence[str] | None = None, max_length: int = 256, query_max_length: int = 32,
                  passage_max_length: int = 224, test_fraction: float = 0.1, seed: int = 0,
                  max_examples: int | None = None, teacher_tokenizer: Any = None) -> TensorSplits:
    """Ranking triples (a query, a relevant and a non-relevant passage; MS MARCO's training triples) from local
    files: each triple is two rows, (query, positive) then (query, negative), kept together by every loader.

    Fields per row: ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``): query and passage encoded together,
    for cross-encoders, at most ``max_length``; ``query_input_ids`` / ``query_attention_mask`` and
    ``passage_input_ids`` / ``passage_attention_mask``: each encoded alone, for bi-encoders
    (:func:`kdrun.models.hf.dot_encoder`); ``positive`` (N,) bool; ``teacher_score`` (N,) float32 when
    ``score_fields`` names the file's columns of teacher scores for the positive and the negative passage
    (Hofstatter et al.'s teacher files: ``[pos_score, neg_score]``). A live cross-encoder teacher reads the
    student's ids: ``teacher_tokenizer`` is checked to have the same vocabulary."""
    fields = [query_field, positive_field, negative_field] + list(score_fields or [])
    if score_fields is not None and len(score_fields) != 2:
        raise KdrunError(f"data.source.score_fields: name two columns (the positive's and the negative's teacher score), "
                         f"got {list(score_fields)}")
    tok = load_tokenizer(tokenizer)
    _with_teacher_tokenizer(tok, teacher_tokenizer)
    rows, test_rows = _record_splits(train, test, fields, test_fraction, seed)
    if max_examples is not None:
        rows = rows[:int(max_examples)]
    out = {}
    for split, split_rows in (("train", rows), ("test", test_rows)):
        queries = [str(r[query_field]) for r in split_rows for _ in range(2)]
        passages = [str(r[f]) for r in split_rows for f in (positive_field, negative_field)]
        pair = tok(queries, passages, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        q = tok(queries, truncation=True, max_length=query_max_length, padding="max_length", return_tensors="pt")
        d = tok(passages, truncation=True, max_length=passage_max_length, padding="max_length", return_tensors="pt")
        f = {k: pair[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in pair}
        f.update(query_input_ids=q["input_ids"].long(), query_attention_mask=q["attention_mask"].long(),
                 passage_input_ids=d["input_ids"].long(), passage_attention_mask=d["attention_mask"].long())
        f["positive"] = (torch.arange(len(queries)) % 2) == 0
        if score_fields is not None:
            try:
                f["teacher_score"] = torch.tensor([float(r[c]) for r in split_rows for c in score_fields], dtype=torch.float32)
            except (TypeError, ValueError):
                raise KdrunError(f"data.source.{split}: the score columns {list(score_fields)} must hold numbers") from None
        out[split] = f
    return TensorSplits(out["train"], out["test"], tokenizer=tok, group=2)


def text_classification(tokenizer: Any, train: str, test: str | None = None, text_field: str = "sentence",
                        label_field: str = "label", text_pair_field: str | None = None, max_length: int = 128,
                        padding: str = "longest", test_fraction: float = 0.1, seed: int = 0,
                        teacher_tokenizer: Any = None, model_tokenizers: Mapping[str, Any] | None = None) -> TensorSplits:
    """Labelled texts (GLUE-style: SST-2's ``sentence``/``label``; MNLI with ``text_pair_field``) from local
    files (:func:`read_records`): fields ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the
    tokenizer makes them) truncated to ``max_length``, and ``target``, the class id, so evaluation reports
    accuracy (top-1) as for images. ``padding`` as in :func:`instructions`.

    ``model_tokenizers: {name: tokenizer}``: models that read the same texts through their own tokenizers (teachers
    of other vocabularies: the class scores they give are comparable whatever the tokens). Each adds the fields
    ``<name>_input_ids``, ``<name>_attention_mask`` (and ``<name>_token_type_ids``), each truncated at
    ``max_length`` of its own tokens (so a long text may be cut at other characters for each model) and cut per
    batch by its own lengths, for ``<name>.inputs``."""
    _check_padding(padding)
    tok = load_tokenizer(tokenizer)
    _with_teacher_tokenizer(tok, teacher_tokenizer)
    own = {}
    for name, spec in dict(model_tokenizers or {}).items():
        if not str(name).isidentifier():
            raise KdrunError(f"data.source.model_tokenizers: '{name}' must be a model name (letters, digits, _)")
        own[str(name)] = load_tokenizer(spec, f"data.source.model_tokenizers.{name}")
    fields = [text_field, label_field] + ([text_pair_field] if text_pair_field else [])
    rows, test_rows = _record_splits(train, test, fields, test_fraction, seed)
    out = {}
    for split, split_rows in (("train", rows), ("test", test_rows)):
        try:
            labels = torch.tensor([int(r[label_field]) for r in split_rows], dtype=torch.long)
        except (TypeError, ValueError):
            raise KdrunError(f"data.source.{split}: '{label_field}' must hold integer class ids") from None
        if (labels < 0).any():
            raise KdrunError(f"data.source.{split}: negative labels in '{label_field}' (an unlabelled test split? "
                             f"GLUE test labels are hidden: evaluate on the validation file)")
        texts = [str(r[text_field]) for r in split_rows]
        pairs = [str(r[text_pair_field]) for r in split_rows] if text_pair_field else None
        enc = tok(texts, pairs, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        f = {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        for name, other in own.items():  # the same texts, each such model's own tokens
            e = other(texts, pairs, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
            f.update({f"{name}_{k}": e[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in e})
        f["target"] = labels
        out[split] = f
    return TensorSplits(out["train"], out["test"], trim_field="attention_mask" if padding == "longest" else None,
                        tokenizer=tok)


__all__ = [
    "IGNORE_INDEX",
    "check_same_vocabulary",
    "format_prompt",
    "instructions",
    "load_tokenizer",
    "preference_pairs",
    "ranking_pairs",
    "pydoc_topics",
    "read_documents",
    "read_records",
    "text_classification",
    "text_corpus",
    "train_tokenizer",
]
