"""Small real-text corpora, a tokenizer trained on them, and indexed datasets, for the data tests.

The text is public domain (Shakespeare's Sonnets 18, 29, 116, 130 and King James Bible verses),
written inline so no test needs the network. Documents are numbered excerpts, so every document
is distinct and its source is known.
"""

from __future__ import annotations

import json
import os
import random

import pytest

SONNETS = """\
Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance, or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall Death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
  So long as men can breathe or eyes can see,
  So long lives this, and this gives life to thee.
When, in disgrace with fortune and men's eyes,
I all alone beweep my outcast state,
And trouble deaf heaven with my bootless cries,
And look upon myself and curse my fate,
Wishing me like to one more rich in hope,
Featur'd like him, like him with friends possess'd,
Desiring this man's art and that man's scope,
With what I most enjoy contented least;
Yet in these thoughts myself almost despising,
Haply I think on thee, and then my state,
Like to the lark at break of day arising
From sullen earth, sings hymns at heaven's gate;
  For thy sweet love remember'd such wealth brings
  That then I scorn to change my state with kings.
Let me not to the marriage of true minds
Admit impediments. Love is not love
Which alters when it alteration finds,
Or bends with the remover to remove:
O no! it is an ever-fixed mark
That looks on tempests and is never shaken;
It is the star to every wandering bark,
Whose worth's unknown, although his height be taken.
My mistress' eyes are nothing like the sun;
Coral is far more red than her lips' red;
If snow be white, why then her breasts are dun;
If hairs be wires, black wires grow on her head.
I have seen roses damask'd, red and white,
But no such roses see I in her cheeks;
And in some perfumes is there more delight
Than in the breath that from my mistress reeks."""

VERSES = """\
In the beginning God created the heaven and the earth.
And the earth was without form, and void; and darkness was upon the face of the deep.
And the Spirit of God moved upon the face of the waters.
And God said, Let there be light: and there was light.
And God saw the light, that it was good: and God divided the light from the darkness.
And God called the light Day, and the darkness he called Night.
And the evening and the morning were the first day.
The LORD is my shepherd; I shall not want.
He maketh me to lie down in green pastures: he leadeth me beside the still waters.
He restoreth my soul: he leadeth me in the paths of righteousness for his name's sake.
Yea, though I walk through the valley of the shadow of death, I will fear no evil.
Thou preparest a table before me in the presence of mine enemies.
Surely goodness and mercy shall follow me all the days of my life.
To every thing there is a season, and a time to every purpose under the heaven:
A time to be born, and a time to die; a time to plant, and a time to pluck up.
A time to weep, and a time to laugh; a time to mourn, and a time to dance."""

SOURCES = {"sonnets": SONNETS.split("\n"), "verses": VERSES.split("\n")}


def make_documents(source: str, num_docs: int, seed: int = 0) -> list[str]:
    """`num_docs` distinct documents: a numbered heading and 2-6 consecutive lines of `source`."""
    lines = SOURCES[source]
    rng = random.Random(f"{source}-{seed}")
    docs = []
    for i in range(num_docs):
        start = rng.randrange(len(lines))
        count = rng.randint(2, 6)
        body = "\n".join(lines[(start + j) % len(lines)] for j in range(count))
        docs.append(f"{source.title()} excerpt {i}\n\n{body}")
    return docs


def write_jsonl(path: str, docs: list[str], key: str = "text") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({key: doc, "meta": {"chars": len(doc)}}) + "\n")
    return path


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> str:
    """A 512-piece BPE SentencePiece model trained on both sources (with megatron metadata)."""
    from mmoe_megatron.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("tokenizer")
    corpus = write_jsonl(
        str(root / "corpus.jsonl"), make_documents("sonnets", 60) + make_documents("verses", 60)
    )
    path = str(root / "tok" / "tokenizer.model")
    train_tokenizer([corpus], path, vocab_size=512, special_tokens=["<|sep|>"])
    return path


@pytest.fixture(scope="session")
def small_datasets(tmp_path_factory, small_tokenizer) -> dict:
    """Indexed datasets 'sonnets' (120 docs) and 'verses' (80 docs): name -> (prefix, docs)."""
    from mmoe_megatron.data.indexed import preprocess

    root = tmp_path_factory.mktemp("datasets")
    out = {}
    for name, num_docs in (("sonnets", 120), ("verses", 80)):
        docs = make_documents(name, num_docs, seed=1)
        corpus = write_jsonl(str(root / f"{name}.jsonl"), docs)
        prefix = str(root / f"{name}_text_document")
        preprocess([corpus], small_tokenizer, prefix, num_workers=1, progress=False)
        out[name] = (prefix, docs)
    return out


def data_config(tmp_path, tokenizer: str, blend: list[tuple[str, float]], **overrides):
    """configs/tiny.yaml pointed at the given tokenizer and (prefix, weight) blend."""
    from tests.helpers import tiny_config

    return tiny_config(**{
        "data.tokenizer": tokenizer,
        "data.blend": [{"prefix": p, "weight": w} for p, w in blend],
        "data.cache_dir": str(tmp_path / "cache"),
        "logging.dir": str(tmp_path / "run"),
        **overrides,
    })


@pytest.fixture(scope="session")
def small_run_config(tmp_path_factory, small_tokenizer, small_datasets) -> str:
    """A config file for a few quick steps of the tiny model on the 'verses' dataset (launcher
    and end-to-end tests): sequence 32, 2 samples per micro-batch, 8 per step, 4 steps."""
    from mmoe_megatron.config import save_config

    tmp = tmp_path_factory.mktemp("small_run")
    cfg = data_config(tmp, small_tokenizer, [(small_datasets["verses"][0], 1.0)], **{
        "data.seq_length": 32, "train.micro_batch_size": 2, "train.global_batch_size": 8,
        "train.train_iters": 4, "train.eval_interval": 0, "train.eval_iters": 2, "train.log_interval": 1,
        "optimizer.warmup_iters": 1, "checkpoint.save_interval": 0, "logging.tensorboard": False,
    })
    path = str(tmp / "config.yaml")
    save_config(cfg, path)
    return path
