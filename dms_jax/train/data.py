"""Training data with Hugging Face `datasets`: load, tokenise, pack, shuffle deterministically.

Documents (a text column, chat `messages` rendered with the tokenizer's chat template, or
pre-tokenised `input_ids`) are tokenised, followed by EOS and packed into rows of exactly
`seq_len` tokens. Two packings (`data.packing`):
  "concat"  documents joined end to end and cut every seq_len tokens (no padding but the last
            row; a document may continue in the next row): natural text, distillation;
  "bin"     documents placed whole, in order, into rows (a row is padded when the next document
            does not fit; a document longer than seq_len is an error): supervised tasks whose
            questions need their context in the same row.
Pre-tokenised documents may carry `target_mask` (int [len(input_ids)]): 1 on the tokens whose
prediction the loss counts (answers), 0 elsewhere; without it every next token counts.
Each row carries
  input_ids      int32 [T]
  attention_mask int32 [T]  1 real token, 0 padding
  loss_mask      int32 [T]  1 where the prediction of the next token counts (0 on padding, on a
                            document's last token, whose successor belongs to another document,
                            and before every token whose target_mask is 0)
  segment_ids    int32 [T]  the document of each token inside its row
Batches are a pure function of a data position (batches consumed so far): epoch e uses the
permutation of `np.random.default_rng([seed, e])`, so saving the position in a checkpoint restores
the exact data order.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Mapping

import numpy as np

_FORMATS = {".json": "json", ".jsonl": "json", ".txt": "text", ".text": "text", ".md": "text",
            ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
PACK_GROUP = 1000  # documents packed together by one `Dataset.map` call
PACKINGS = ("concat", "bin")
TARGET_COLUMN = "target_mask"


class DataError(ValueError):
    """The dataset is missing, empty or does not fit the model / batch."""


def _format_of(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    ext = os.path.splitext(name)[1].lower()
    if ext not in _FORMATS:
        raise DataError(
            f"cannot tell the format of {path!r} from its extension; set data.format to one of "
            f"{sorted(set(_FORMATS.values()))}"
        )
    return _FORMATS[ext]


def _local_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(f) and not os.path.basename(f).startswith("."))
    else:
        files = sorted(glob.glob(path)) if any(c in path for c in "*?[") else [path]
    files = [f for f in files if os.path.exists(f)]
    if not files:
        raise DataError(f"data.path={path!r}: no such file or directory (nothing to train on)")
    if all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"data.path={path!r}: the dataset is empty ({len(files)} empty file(s), nothing to train on)")
    return files


def load_documents(data_cfg: Mapping[str, Any]):
    """A `datasets.Dataset` of raw documents from data.path (local) or data.hub_id."""
    import datasets

    from dms_jax.train.rows import bad_json_lines, bad_rows_message, check_rows, json_rows_without

    path, hub_id = data_cfg.get("path"), data_cfg.get("hub_id")
    split = data_cfg.get("split") or "train"
    cache_dir = data_cfg.get("cache_dir")
    if path:
        files = _local_files(path)
        fmt = data_cfg.get("format") or _format_of(files[0])
        try:
            ds = datasets.load_dataset(fmt, data_files={"train": files}, split="train", cache_dir=cache_dir)
        except Exception as err:  # malformed JSON, empty files ...
            bad = bad_json_lines(files, data_cfg) if fmt == "json" else []
            if not bad:
                raise DataError(f"could not read {files[:3]} as {fmt!r}: {type(err).__name__}: {err}") from err
            if not data_cfg.get("skip_bad_rows"):
                raise DataError(bad_rows_message(bad, len(bad))) from err
            ds = json_rows_without(files, bad, data_cfg)
        ds = check_rows(ds, data_cfg, files, fmt)
    elif hub_id:
        try:
            ds = datasets.load_dataset(hub_id, data_cfg.get("hub_config"), split=split, cache_dir=cache_dir)
        except Exception as err:
            raise DataError(
                f"could not load hub dataset {hub_id!r} (split {split!r}): {type(err).__name__}: {err}. "
                "Offline? Download it first, or point data.path at local JSONL / text / parquet files."
            ) from err
        ds = check_rows(ds, data_cfg, [f"hub dataset {hub_id!r}"], "hub")
    else:
        raise DataError("no training data: set --config.data.path=FILE_OR_DIR or --config.data.hub_id=NAME")
    if len(ds) == 0:
        raise DataError(f"the dataset at {path or hub_id!r} has no rows (nothing to train on)")
    max_docs = data_cfg.get("max_documents")
    if max_docs:
        ds = ds.select(range(min(int(max_docs), len(ds))))
    return ds


def _document_targets(batch, columns) -> list[list[int]] | None:
    """The per-token target masks of pre-tokenised documents, checked against their ids."""
    if TARGET_COLUMN not in columns:
        return None
    targets = [list(map(int, t)) for t in batch[TARGET_COLUMN]]
    for i, (ids, t) in enumerate(zip(batch["input_ids"], targets)):
        if len(t) != len(ids):
            raise DataError(f"document {i} of a batch has {len(ids)} input_ids but {len(t)} "
                            f"{TARGET_COLUMN} entries: they must have the same length")
    return targets


def _document_ids(batch, columns, tokenizer, data_cfg) -> list[list[int]]:
    """Token ids of each document of a `Dataset.map` batch."""
    if "input_ids" in columns:  # pre-tokenised
        return [list(map(int, ids)) for ids in batch["input_ids"]]
    if TARGET_COLUMN in columns:
        raise DataError(f"a {TARGET_COLUMN!r} column needs pre-tokenised documents ('input_ids')")
    if tokenizer is None:
        raise DataError("the data is text but no tokenizer was found: set data.tokenizer=DIR")
    messages_field = data_cfg.get("messages_field") or "messages"
    text_field = data_cfg.get("text_field") or "text"
    if data_cfg.get("chat_template"):
        if messages_field not in columns:
            raise DataError(f"data.chat_template=True needs a {messages_field!r} column; columns: {columns}")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template: set data.chat_template=False")
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in batch[messages_field]]
        add_special = False  # the template writes its own special tokens
    else:
        if text_field not in columns:
            raise DataError(
                f"no text column {text_field!r} in the data (columns: {columns}); set data.text_field, "
                "or data.chat_template=True for a 'messages' column"
            )
        texts = batch[text_field]  # every row a string: check_rows saw to it
        add_special = True
    return tokenizer(texts, add_special_tokens=add_special)["input_ids"]


def _with_eos(docs, targets, eos_id):
    """Non-empty documents, each ending in EOS, with a loss flag per token (1: the prediction of
    the next token counts; 0 at the document's last token)."""
    out = []
    for i, doc in enumerate(docs):
        doc = list(doc)
        if not doc:
            continue
        target = [1] * len(doc) if targets is None else list(targets[i])
        if eos_id is not None and doc[-1] != eos_id:
            doc.append(eos_id)
            target.append(1 if targets is None else 0)
        # position i counts when its successor, inside the same document, is a target
        out.append((doc, target[1:] + [0]))
    return out


def _row_streams(docs, seq_len: int, packing: str):
    """Rows of (tokens, loss flags, last-of-document flags) before padding."""
    if packing not in PACKINGS:
        raise DataError(f"data.packing={packing!r}; use one of {PACKINGS}")
    if packing == "concat":
        tokens, target, last = [], [], []
        for doc, t in docs:
            tokens += doc
            target += t
            last += [0] * (len(doc) - 1) + [1]
        for start in range(0, len(tokens), seq_len):
            yield tokens[start:start + seq_len], target[start:start + seq_len], last[start:start + seq_len]
        return
    row = ([], [], [])
    for doc, t in docs:
        if len(doc) > seq_len:
            raise DataError(f"data.packing='bin' keeps documents whole, but a document has {len(doc)} "
                            f"tokens (with EOS) > train.seq_len={seq_len}: raise train.seq_len, "
                            "shorten the documents or use data.packing='concat'")
        if len(row[0]) + len(doc) > seq_len:
            yield row
            row = ([], [], [])
        row[0].extend(doc)
        row[1].extend(t)
        row[2].extend([0] * (len(doc) - 1) + [1])
    if row[0]:
        yield row


def pack_documents(docs: list[list[int]], seq_len: int, eos_id: int | None, pad_id: int = 0, *,
                   targets: list[list[int]] | None = None, packing: str = "concat") -> dict:
    """Pack documents (each followed by EOS) into rows of seq_len (see the module docstring).

    targets: per-document target flags (1 where predicting that token counts) or None (all).
    Returns {"input_ids", "attention_mask", "loss_mask", "segment_ids"}: lists of int lists of
    length seq_len; segment_ids numbers the documents inside each row (0, 1, ...; padding gets
    the next id), so attention can stay within a document.
    """
    rows = {"input_ids": [], "attention_mask": [], "loss_mask": [], "segment_ids": []}
    for ids, target, ends in _row_streams(_with_eos(docs, targets, eos_id), seq_len, packing):
        pad = seq_len - len(ids)
        rows["input_ids"].append(ids + [pad_id] * pad)
        rows["attention_mask"].append([1] * len(ids) + [0] * pad)
        rows["loss_mask"].append(list(target) + [0] * pad)
        segments = [0]
        for e in ends[:-1]:  # a document's last token ends its segment
            segments.append(segments[-1] + e)
        rows["segment_ids"].append(segments[:len(ids)] + [segments[-1] + ends[-1]] * pad)
    return rows


def tokenize_and_pack(ds, tokenizer, seq_len: int, data_cfg: Mapping[str, Any]):
    """Raw documents -> a numpy-formatted Dataset of packed rows."""
    columns = list(ds.column_names)
    if tokenizer is not None:
        eos_id = getattr(tokenizer, "eos_token_id", None)
    else:
        eos_id = data_cfg.get("eos_id")
        eos_id = None if eos_id is None or int(eos_id) < 0 else int(eos_id)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)

    packing = data_cfg.get("packing") or "concat"

    def pack(batch):
        return pack_documents(_document_ids(batch, columns, tokenizer, data_cfg), seq_len, eos_id, pad_id,
                              targets=_document_targets(batch, columns), packing=packing)

    packed = ds.map(pack, batched=True, batch_size=PACK_GROUP, remove_columns=columns,
                    keep_in_memory=bool(data_cfg.get("keep_in_memory", False)),
                    desc="tokenise and pack")
    if len(packed) == 0:
        raise DataError("the dataset holds no tokens after tokenisation (all documents empty)")
    return packed.with_format("numpy")


class PackedData:
    """Packed rows plus the deterministic batch order.

    batch(position) is the `position`-th global batch (position = batches consumed so far).
    """

    def __init__(self, rows, batch_size: int, seed: int):
        self.rows = rows
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_sequences = len(rows)
        if self.num_sequences < self.batch_size:
            raise DataError(
                f"the data packs into {self.num_sequences} sequences, fewer than the global batch "
                f"size {self.batch_size}: add data, shorten train.seq_len or lower train.batch_size"
            )
        self.steps_per_epoch = self.num_sequences // self.batch_size
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, position: int) -> np.ndarray:
        epoch, i = divmod(int(position), self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]

    def batch(self, position: int) -> dict[str, np.ndarray]:
        rows = self.rows[self.indices(position).tolist()]
        out = {k: np.asarray(rows[k], np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
        segments = rows["segment_ids"] if "segment_ids" in rows else None
        out["segment_ids"] = (np.zeros_like(out["input_ids"]) if segments is None
                              else np.asarray(segments, np.int32))
        return out

    def max_token_id(self) -> int:
        return max(int(np.max(self.rows[i:i + 4096]["input_ids"])) for i in range(0, self.num_sequences, 4096))

    def check_vocab(self, vocab_size: int) -> None:
        top = self.max_token_id()
        if top >= vocab_size:
            raise DataError(
                f"the data holds token id {top} but the model's vocabulary has {vocab_size} entries: "
                "the tokenizer does not match the model (set data.tokenizer to the model's tokenizer)"
            )

    def fingerprint(self) -> dict:
        return {"num_sequences": self.num_sequences, "batch_size": self.batch_size, "seed": self.seed}


def build_data(data_cfg: Mapping[str, Any], tokenizer, *, seq_len: int, batch_size: int,
               vocab_size: int | None) -> PackedData:
    """Load, tokenise and pack; check the ids against the model's vocabulary when given."""
    if seq_len < 2:
        raise DataError(f"train.seq_len={seq_len} must be >= 2")
    rows = tokenize_and_pack(load_documents(data_cfg), tokenizer, seq_len, data_cfg)
    data = PackedData(rows, batch_size, data_cfg.get("seed", 0))
    if vocab_size is not None:
        data.check_vocab(vocab_size)
    return data
