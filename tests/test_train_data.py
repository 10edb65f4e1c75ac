"""Training data: loading (JSONL / text / parquet / pre-tokenised), packing, deterministic order."""
import json
import re

import numpy as np
import pytest

from dms_jax.assets import TINY_MODEL_DIR
from dms_jax.train.data import DataError, PackedData, build_data, pack_documents


@pytest.fixture(scope="module")
def tokenizer():
    import dms_jax

    return dms_jax.load_tokenizer(TINY_MODEL_DIR)


def _cfg(tmp_path, **kw):
    return {"cache_dir": str(tmp_path / "cache"), "keep_in_memory": True, "seed": 0, **kw}


def test_packing_joins_documents_with_eos_and_masks_boundaries():
    rows = pack_documents([[5, 6, 7], [], [8, 9], [10]], seq_len=4, eos_id=1, pad_id=0)
    # stream: 5 6 7 1 | 8 9 1 10 | 1
    assert rows["input_ids"] == [[5, 6, 7, 1], [8, 9, 1, 10], [1, 0, 0, 0]]
    assert rows["attention_mask"] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]
    # a document's last token (EOS) predicts the next document's first token: does not count
    assert rows["loss_mask"] == [[1, 1, 1, 0], [1, 1, 0, 1], [0, 0, 0, 0]]
    # documents numbered within each row (padding: the next id), for document-only attention
    assert rows["segment_ids"] == [[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1]]


def test_jsonl_text_and_parquet_give_the_same_packed_rows(tmp_path, tokenizer):
    docs = [f"document number {i} " + "word " * (i % 7 + 3) for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "d.txt").write_text("\n".join(docs) + "\n")
    import datasets

    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    got = []
    for name in ("d.jsonl", "d.txt", "d.parquet"):
        data = build_data(_cfg(tmp_path, path=str(tmp_path / name)), tokenizer, seq_len=16,
                          batch_size=4, vocab_size=512)
        got.append(np.asarray(data.rows["input_ids"]))
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[0], got[2])
    # the packed stream is the documents' tokens, each followed by EOS
    stream = got[0].reshape(-1)
    ref = sum((tokenizer(d)["input_ids"] + [tokenizer.eos_token_id] for d in docs), [])
    np.testing.assert_array_equal(stream[:len(ref)], ref)


def test_pretokenised_jsonl_needs_no_tokenizer(tmp_path):
    rows = [{"input_ids": list(range(i, i + 10))} for i in range(20)]
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_data(_cfg(tmp_path, path=str(tmp_path / "ids.jsonl"), eos_id=-1), None, seq_len=8,
                      batch_size=2, vocab_size=64)
    np.testing.assert_array_equal(np.asarray(data.rows["input_ids"])[0], np.arange(8))


def test_batch_order_is_a_seeded_permutation_per_epoch():
    rows = {"input_ids": np.arange(10)[:, None] * np.ones((1, 4), int),
            "attention_mask": np.ones((10, 4), int), "loss_mask": np.ones((10, 4), int)}

    class Rows:
        def __len__(self):
            return 10

        def __getitem__(self, idx):
            return {k: v[idx] for k, v in rows.items()}

    a, b, c = PackedData(Rows(), 3, seed=7), PackedData(Rows(), 3, seed=7), PackedData(Rows(), 3, seed=8)
    assert a.steps_per_epoch == 3  # 10 // 3: the last incomplete batch of an epoch is skipped
    order_a = [a.batch(p)["input_ids"][:, 0].tolist() for p in range(6)]
    assert order_a == [b.batch(p)["input_ids"][:, 0].tolist() for p in range(6)]  # deterministic
    assert order_a != [c.batch(p)["input_ids"][:, 0].tolist() for p in range(6)]  # seeded
    epoch0 = sum(order_a[:3], [])
    assert len(set(epoch0)) == 9  # no repeats inside an epoch
    assert order_a[:3] != order_a[3:]  # a fresh permutation each epoch
    # random access: position 4 on a fresh object equals position 4 reached sequentially
    assert PackedData(Rows(), 3, seed=7).batch(4)["input_ids"][:, 0].tolist() == order_a[4]


def test_data_errors_are_clear(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        build_data(_cfg(tmp_path, path=str(tmp_path / "missing.jsonl")), tokenizer, seq_len=8,
                   batch_size=1, vocab_size=512)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        build_data(_cfg(tmp_path, path=str(tmp_path / "empty.jsonl")), tokenizer, seq_len=8,
                   batch_size=1, vocab_size=512)
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="no tokens"):
        build_data(_cfg(tmp_path, path=str(tmp_path / "blank.jsonl")), tokenizer, seq_len=8,
                   batch_size=1, vocab_size=512)
    (tmp_path / "small.jsonl").write_text(json.dumps({"text": "a few words only"}) + "\n")
    with pytest.raises(DataError, match="fewer than the global batch size"):
        build_data(_cfg(tmp_path, path=str(tmp_path / "small.jsonl")), tokenizer, seq_len=8,
                   batch_size=8, vocab_size=512)
    with pytest.raises(DataError, match="vocabulary"):
        build_data(_cfg(tmp_path, path=str(tmp_path / "small.jsonl")), tokenizer, seq_len=8,
                   batch_size=1, vocab_size=100)
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "text under another name"}) + "\n")
    with pytest.raises(DataError, match="text_field"):
        build_data(_cfg(tmp_path, path=str(tmp_path / "other.jsonl")), tokenizer, seq_len=8,
                   batch_size=1, vocab_size=512)
    with pytest.raises(DataError, match="no training data"):
        build_data(_cfg(tmp_path), tokenizer, seq_len=8, batch_size=1, vocab_size=512)


def test_chat_messages_rendered_with_the_chat_template(tmp_path, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chats = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "answer " * i}]
             for i in range(1, 30)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    cfg = _cfg(tmp_path, path=str(tmp_path / "chat.jsonl"), chat_template=True)
    data = build_data(cfg, tok, seq_len=16, batch_size=2, vocab_size=512)
    first = tok(tok.apply_chat_template(chats[0], tokenize=False), add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(np.asarray(data.rows["input_ids"]).reshape(-1)[:len(first)], first)
    with pytest.raises(DataError, match="no chat template"):
        build_data(cfg, tokenizer, seq_len=16, batch_size=2, vocab_size=512)


def test_bin_packing_keeps_documents_whole_and_counts_only_targets():
    # documents of 3, 2 and 1 tokens, targets on the last token of each; rows of 5
    rows = pack_documents([[5, 6, 7], [8, 9], [10]], seq_len=5, eos_id=1, pad_id=0,
                          targets=[[0, 0, 1], [0, 1], [1]], packing="bin")
    # 5 6 7 1 (next doc of 3 tokens does not fit: pad) | 8 9 1 10 1
    assert rows["input_ids"] == [[5, 6, 7, 1, 0], [8, 9, 1, 10, 1]]
    assert rows["attention_mask"] == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # position t counts when token t + 1 is a target of the same document; EOS never is
    assert rows["loss_mask"] == [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]]
    assert rows["segment_ids"] == [[0, 0, 0, 0, 1], [0, 0, 0, 1, 1]]


def test_bin_packing_refuses_a_document_longer_than_a_row():
    with pytest.raises(DataError, match="keeps documents whole"):
        pack_documents([[5] * 6], seq_len=5, eos_id=1, packing="bin")
    with pytest.raises(DataError, match="data.packing"):
        pack_documents([[5]], seq_len=5, eos_id=1, packing="zip")


def test_target_masks_travel_from_jsonl_to_the_loss_mask(tmp_path):
    docs = [{"input_ids": [2, 3, 4, 5], "target_mask": [0, 0, 1, 1]},
            {"input_ids": [6, 7, 8], "target_mask": [0, 1, 0]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs * 4))
    data = build_data(_cfg(tmp_path, path=str(tmp_path / "t.jsonl"), eos_id=1, packing="bin"), None,
                      seq_len=8, batch_size=2, vocab_size=16)
    ids, loss = np.asarray(data.rows["input_ids"]), np.asarray(data.rows["loss_mask"])
    real = np.asarray(data.rows["attention_mask"])
    # every row holds one whole document: 2 3 4 5 1 | 6 7 8 1 do not fit in 8 together
    assert ids[0, :5].tolist() == [2, 3, 4, 5, 1] and real[0].tolist() == [1] * 5 + [0] * 3
    assert loss[0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert ids[1, :4].tolist() == [6, 7, 8, 1] and real[1].tolist() == [1] * 4 + [0] * 4
    assert loss[1].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input_ids": [2, 3], "target_mask": [1]}) + "\n")
    with pytest.raises(DataError, match="same length"):
        build_data(_cfg(tmp_path, path=str(tmp_path / "bad.jsonl"), eos_id=1), None, seq_len=8,
                   batch_size=1, vocab_size=16)


def test_bad_rows_are_named_by_file_and_line_or_skipped_when_asked(tmp_path, tokenizer, caplog):
    good = [{"text": f"document {i} " + "word " * (i % 5 + 4)} for i in range(24)]
    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in good))

    def write(name, bad_lines):  # {line number: raw text}; good rows fill the other lines
        rows, it = [], iter(good)
        for number in range(1, len(good) + len(bad_lines) + 1):
            rows.append(bad_lines[number] if number in bad_lines else json.dumps(next(it)))
        (tmp_path / name).write_text("\n".join(rows) + "\n")
        return str(tmp_path / name)

    cases = {
        "missing.jsonl": ({3: json.dumps({"body": "x"}), 6: json.dumps({"text": None})},
                          r"2 bad row\(s\) in the data: .*missing\.jsonl, line 3: no 'text' \(missing or null\); "
                          r".*missing\.jsonl, line 6: no 'text'.*data\.skip_bad_rows=True"),
        "number.jsonl": ({2: json.dumps({"text": 12345})},
                         r"1 bad row\(s\) in the data: .*number\.jsonl, line 2: 'text' is a int \('12345'\), not a string"),
        "malformed.jsonl": ({4: '{"text": "cut short'},
                            r"1 bad row\(s\) in the data: .*malformed\.jsonl, line 4: not valid JSON"),
    }
    for name, (bad_lines, message) in cases.items():
        with pytest.raises(DataError, match=message):
            build_data(_cfg(tmp_path, path=write(name, bad_lines)), tokenizer, seq_len=16, batch_size=2,
                       vocab_size=512)

    # a blank line does not shift the count; every kind at once, skipped under the option
    mixed = write("mixed.jsonl", {2: "", 3: json.dumps({"body": "x"}), 5: json.dumps({"text": None}),
                                  7: json.dumps({"text": 12345}), 9: "[1, 2]", 11: "{not json"})
    with caplog.at_level("WARNING"):
        got = build_data(_cfg(tmp_path, path=mixed, skip_bad_rows=True), tokenizer, seq_len=16, batch_size=2,
                         vocab_size=512)
    assert re.search(r"skipped 5 bad row\(s\) \(data\.skip_bad_rows=True\): .*mixed\.jsonl, line 3: no 'text'.*"
                     r"line 5: no 'text'.*line 7: 'text' is a int.*line 9: a JSON list.*line 11: not valid JSON",
                     caplog.text), caplog.text
    want = build_data(_cfg(tmp_path, path=str(clean)), tokenizer, seq_len=16, batch_size=2, vocab_size=512)
    np.testing.assert_array_equal(np.asarray(got.rows["input_ids"]), np.asarray(want.rows["input_ids"]))


def test_the_extension_decides_the_format_over_the_tiny_config(tmp_path):
    from dms_jax.train.data import load_documents
    from tests.test_train_loop import load_config_file

    c = load_config_file("tiny")
    assert load_documents(c.data)["text"][0].startswith("# ")  # the README, read as text lines
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a document"}) + "\n")
    c.data.update(path=str(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "cache"))
    assert load_documents(c.data)["text"] == ["a document"]  # JSON lines, not raw text
    c.data.format = "text"  # an explicit format still wins
    assert load_documents(c.data)["text"] == ['{"text": "a document"}']
