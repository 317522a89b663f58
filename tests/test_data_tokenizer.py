"""Tokenizer training and loading through megatron-core (mmoe_megatron/data/tokenizer.py)."""

from __future__ import annotations

import json
import os

import pytest

from mmoe_megatron.data.errors import DataError
from mmoe_megatron.data.tokenizer import SentencePieceEncoder, load_tokenizer, train_tokenizer
from tests.data_fixtures import SONNETS, VERSES, make_documents, small_tokenizer, write_jsonl  # noqa: F401

TRICKY = "Shall I compare thee?\n  Thou art  more lovely,\n\n\tand naïve café — 東京 1984.\n"


def test_trained_model_loads_as_megatron_gpt_tokenizer_with_reserved_ids(small_tokenizer):
    from megatron.core.tokenizers.text.models import GPTTokenizer

    with open(os.path.join(os.path.dirname(small_tokenizer), "tokenizer_metadata.json")) as f:
        metadata = json.load(f)
    assert metadata["library"] == "sentencepiece" and metadata["model_type"] == "gpt"
    tok = load_tokenizer(small_tokenizer)
    assert isinstance(tok, GPTTokenizer)
    assert tok.vocab_size == 512
    assert (tok.eod, tok.pad) == (2, 3)
    assert tok.detokenize([tok.eod]) == ""  # a control piece, not text
    # The user special token is one piece (id 4, after the reserved ones); text cannot forge the end-of-document token.
    ids = tok.tokenize("first<|sep|>second")
    assert ids.count(4) == 1 and tok.detokenize(ids) == "first<|sep|>second"
    assert tok.eod not in tok.tokenize("</s> text")


def test_decoding_gives_back_the_exact_text(small_tokenizer):
    tok = load_tokenizer(small_tokenizer)
    for text in [TRICKY, SONNETS, VERSES, " leading space", "trailing space "]:
        assert tok.detokenize(tok.tokenize(text)) == text
    # Unseen characters fall back to their UTF-8 bytes instead of <unk>.
    assert 0 not in tok.tokenize(TRICKY)


def test_light_encoder_matches_megatron_tokenizer(small_tokenizer):
    tok, enc = load_tokenizer(small_tokenizer), SentencePieceEncoder(small_tokenizer)
    assert (enc.vocab_size, enc.eod) == (tok.vocab_size, tok.eod)
    for text in [TRICKY] + make_documents("sonnets", 5, seed=3):
        assert enc.encode(text) == tok.tokenize(text)


def test_training_is_deterministic_and_unigram_works(tmp_path):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents("verses", 40))
    a = train_tokenizer([corpus], str(tmp_path / "a" / "tokenizer.model"), 400)
    b = train_tokenizer([corpus], str(tmp_path / "b" / "tokenizer.model"), 400)
    assert open(a.model_path, "rb").read() == open(b.model_path, "rb").read()
    assert a.num_documents == 40
    uni = train_tokenizer([corpus], str(tmp_path / "u" / "tokenizer.model"), 400, model_type="unigram")
    tok = load_tokenizer(uni.model_path)
    assert tok.vocab_size == 400 and tok.detokenize(tok.tokenize(VERSES)) == VERSES
    assert open(uni.model_path, "rb").read() != open(a.model_path, "rb").read()


def test_bare_sentencepiece_model_without_metadata_loads(tmp_path, small_tokenizer):
    bare = tmp_path / "elsewhere" / "sp.model"
    bare.parent.mkdir()
    bare.write_bytes(open(small_tokenizer, "rb").read())
    assert load_tokenizer(str(bare)).tokenize("The LORD") == load_tokenizer(small_tokenizer).tokenize("The LORD")


def test_missing_tokenizer_names_the_file_and_the_tools(tmp_path):
    missing = str(tmp_path / "none" / "tokenizer.model")
    with pytest.raises(DataError, match=rf"tokenizer {missing} not found; train one with `python "
                                        r"tools/train_tokenizer.py.*prepare_demo_corpus.py"):
        load_tokenizer(missing)


def test_damaged_tokenizer_file_is_reported(tmp_path):
    broken = tmp_path / "tokenizer.model"
    broken.write_bytes(b"not a protobuf at all")
    with pytest.raises(DataError, match=rf"{broken}.*(cannot be loaded|not a SentencePiece).*retrain"):
        load_tokenizer(str(broken))


def test_bad_training_requests_are_refused_with_a_fix(tmp_path):
    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents("verses", 5))
    with pytest.raises(DataError, match=r"vocab size 100 leaves no room.*larger --vocab-size"):
        train_tokenizer([corpus], str(tmp_path / "t.model"), 100)
    with pytest.raises(DataError, match=r"must end in .model"):
        train_tokenizer([corpus], str(tmp_path / "t.spm"), 400)
    with pytest.raises(DataError, match=r"corpus is too small for this vocabulary: lower --vocab-size"):
        train_tokenizer([corpus], str(tmp_path / "t.model"), 5000)
    blank = write_jsonl(str(tmp_path / "blank.jsonl"), ["   ", "\n"])
    with pytest.raises(DataError, match=r"no non-empty documents in .*blank.jsonl"):
        train_tokenizer([blank], str(tmp_path / "t.model"), 400)


def test_cli_trains_and_reports_errors(tmp_path, capsys):
    from tools.train_tokenizer import main

    corpus = write_jsonl(str(tmp_path / "c.jsonl"), make_documents("sonnets", 30), key="body")
    out = str(tmp_path / "tok" / "tokenizer.model")
    assert main(["--input", corpus, "--output", out, "--vocab-size", "400", "--json-key", "body"]) == 0
    assert "400 pieces" in capsys.readouterr().out
    assert load_tokenizer(out).vocab_size == 400
    assert main(["--input", corpus, "--output", out, "--vocab-size", "400"]) == 2
    assert "no field 'text'" in capsys.readouterr().err
