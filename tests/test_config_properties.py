"""Property test of config validation: mutate one field of the tiny config (or add a key) to a
value drawn from a wide mix of types and ranges, and compare the loader's verdict with an
oracle written here from the field's documented contract (type, bounds, and the relations the
tiny config's other fields impose on it).

An invalid mutation must raise ConfigError naming the mutated field, or the field of the
relation it broke (e.g. a micro-batch size that no longer divides the global batch size is
reported at train.global_batch_size). A valid mutation must load and hold the value.
"""

from __future__ import annotations

import copy
import math

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mmoe_megatron.config import ConfigError, config_from_dict
from mmoe_megatron.config.base import to_dict
from tests.helpers import TINY

with open(TINY) as f:
    BASE = yaml.safe_load(f)
BASE["data"]["mock"] = True  # no tokenizer file needed to load


# --- what the oracle accepts ---------------------------------------------------------------------


def as_int(v):
    """The integer a field typed `int` accepts `v` as, or None (bools are not integers)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return int(v) if math.isfinite(v) and v.is_integer() and abs(v) < 2**53 else None
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            return None
    return None


def as_float(v):
    """The finite number a field typed `float` accepts `v` as, or None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        out = float(v)
    elif isinstance(v, str):
        try:
            out = float(v)
        except ValueError:
            return None
    else:
        return None
    return out if math.isfinite(out) else None


OK = ()  # the verdict "valid"


def integer(*, ge=None, relations=()):
    """An int field with a lower bound and cross-field relations [(holds(n), field named)]."""
    def judge(path, v):
        n = as_int(v)
        if n is None or (ge is not None and n < ge):
            return (path,)
        for holds, named in relations:
            if not holds(n):
                return (named,)
        return OK
    return judge


def number(*, gt=None, ge=None, lt=None, le=None, optional=False, relations=()):
    def judge(path, v):
        if v is None and optional:
            return OK
        x = as_float(v)
        if x is None or (gt is not None and x <= gt) or (ge is not None and x < ge) \
                or (lt is not None and x >= lt) or (le is not None and x > le):
            return (path,)
        for holds, named in relations:
            if not holds(x):
                return (named,)
        return OK
    return judge


def choice(*allowed, relations=()):
    def judge(path, v):
        # Literal fields compare by value and type: 1.0 is not the zero stage 1, "1" neither.
        if not any(v == a and type(v) is type(a) for a in allowed):
            return (path,)
        for holds, named in relations:
            if not holds(v):
                return (named,)
        return OK
    return judge


def boolean(path, v):
    return OK if isinstance(v, bool) else (path,)


def optional_string(path, v):
    return OK if v is None or isinstance(v, str) else (path,)


def ks_list(path, v):
    # The tiny config: 8 experts, layerwise strategy, top-k-then-softmax normalisation.
    if not isinstance(v, list) or not v:
        return (path,)
    ints = [as_int(x) for x in v]
    if any(i is None for i in ints):
        return tuple(f"{path}[{j}]" for j, i in enumerate(ints) if i is None)[:1]
    if min(ints) < 1 or sorted(set(ints)) != ints:
        return (path,)
    if max(ints) == 1:
        return ("matryoshka.normalization",)
    if max(ints) > 8:
        return (path,)
    return OK


# The tiny config's neighbours of each field: 4 layers, hidden 64, 2 heads, 1 query group,
# 8 experts, ks 1..4, eval_ks up to 8, micro-batch 4, global batch 16, 300 iterations with 30 of
# warmup, lr 3e-3 and min_lr 3e-4, expert parallel 1.
ORACLE = {
    "model.num_layers": integer(ge=1),
    "model.hidden_size": integer(ge=1, relations=[(lambda n: n % 2 == 0, "model.hidden_size")]),
    "model.num_attention_heads": integer(ge=1, relations=[(lambda n: 64 % n == 0, "model.hidden_size")]),
    "model.num_query_groups": lambda p, v: OK if v is None else integer(
        ge=1, relations=[(lambda n: 2 % n == 0, p)])(p, v),
    "model.norm_epsilon": number(gt=0),
    "model.normalization": choice("RMSNorm", "LayerNorm"),
    "model.qk_layernorm": boolean,
    "moe.num_experts": integer(ge=2, relations=[(lambda n: n >= 4, "matryoshka.ks"),
                                                (lambda n: n >= 8, "matryoshka.eval_ks")]),
    "moe.aux_loss_coeff": number(ge=0),
    "moe.capacity_factor": number(gt=0, optional=True),
    "moe.dispatcher": choice("alltoall", "allgather"),
    "matryoshka.ks": ks_list,
    "matryoshka.strategy": choice("fixed", "global", "microbatch", "layerwise", "token",
                                  relations=[(lambda s: s != "fixed", "matryoshka.ks")]),
    "matryoshka.tau": number(gt=0),
    "matryoshka.top_p": number(gt=0, le=1),
    "matryoshka.sync_check_interval": integer(ge=0),
    "train.micro_batch_size": integer(ge=1, relations=[(lambda n: 16 % n == 0, "train.global_batch_size")]),
    "train.global_batch_size": integer(ge=1, relations=[(lambda n: n % 4 == 0, "train.global_batch_size")]),
    "train.train_iters": integer(ge=1, relations=[(lambda n: n >= 30, "optimizer.warmup_iters")]),
    "train.precision": choice("fp32", "bf16"),
    "optimizer.lr": number(gt=0, relations=[(lambda x: x >= 3e-4, "optimizer.min_lr")]),
    "optimizer.beta1": number(ge=0, lt=1),
    "optimizer.zero_stage": choice(1, 2),
    "parallel.expert": integer(ge=1, relations=[(lambda n: 8 % n == 0, "parallel.expert")]),
    "parallel.pipeline": integer(ge=1, relations=[(lambda n: n == 1, "parallel.pipeline")]),
    "checkpoint.keep_last": integer(ge=1),
    "checkpoint.load": optional_string,
}
SECTIONS = ["model", "moe", "matryoshka", "data", "train", "optimizer", "parallel", "checkpoint", "logging"]

# Values of every kind, biased towards the boundaries the fields above care about.
EDGES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 29, 30, 31, 64, 0.0, 1.0, 0.999, 1e-4, 2.9e-4, 3e-4, -1, -0.5]
scalars = st.one_of(
    st.sampled_from(EDGES),
    st.integers(-3, 20),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 1.0, 2.0, 0.5, 1e-9, -0.0, 1.5, 4.0, 16.0]),
    st.booleans(),
    st.none(),
    st.text(alphabet="0123456789.-eabcLRMSNorm", max_size=6),
    st.sampled_from(["RMSNorm", "LayerNorm", "fixed", "token", "alltoall", "fp32", "bf16", "1", "4", "2e-3"]),
)
values = st.one_of(scalars, st.lists(st.one_of(st.integers(-1, 10), scalars), max_size=5))


def _load(path, value):
    data = copy.deepcopy(BASE)
    section, key = path.split(".")
    data.setdefault(section, {})[key] = value
    return config_from_dict(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(sorted(ORACLE)), value=values)
@example(path="matryoshka.ks", value=["2"])  # a list of numeric strings, kept as ints
def test_one_mutated_field_is_accepted_or_refused_by_name(path, value):
    named = ORACLE[path](path, value)
    try:
        cfg = _load(path, value)
    except ConfigError as e:
        assert named, f"{path}={value!r} is valid but was refused: {e}"
        assert e.path in named, f"{path}={value!r}: the error names {e.path!r}, expected one of {named}: {e}"
        return
    assert not named, f"{path}={value!r} is invalid ({named[0]}) but was accepted"
    section, key = path.split(".")
    held = to_dict(cfg)[section][key]
    assert _same(held, value), (path, value, held)


def _same(held, given) -> bool:
    """The loader keeps a valid value, converting only a string to the field's type (in lists too)."""
    if isinstance(held, list) and isinstance(given, list):
        return len(held) == len(given) and all(_same(h, g) for h, g in zip(held, given))
    return held == given or (isinstance(given, str) and held == type(held)(given))


@settings(max_examples=100, deadline=None)
@given(section=st.sampled_from(SECTIONS),
       key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12), value=scalars)
def test_an_unknown_key_is_refused_by_its_dotted_name(section, key, value):
    data = copy.deepcopy(BASE)
    if key in data.get(section, {}) or key in config_field_names(section):
        return  # a real field, covered above
    data.setdefault(section, {})[key] = value
    try:
        config_from_dict(data)
    except ConfigError as e:
        assert e.path == f"{section}.{key}" and "unknown key" in str(e)
    else:
        raise AssertionError(f"{section}.{key} is not a field but was accepted")


def config_field_names(section: str) -> set:
    import dataclasses
    import typing

    from mmoe_megatron.config.schema import ExperimentConfig

    return {f.name for f in dataclasses.fields(typing.get_type_hints(ExperimentConfig)[section])}


# Valid configs built jointly (several fields at once, consistent with each other) load as given.
@st.composite
def consistent_routing(draw):
    num_experts = draw(st.sampled_from([4, 8, 16, 32]))
    ks = sorted(draw(st.sets(st.integers(1, num_experts), min_size=1, max_size=5)))
    strategy = "fixed" if len(ks) == 1 else draw(st.sampled_from(["global", "microbatch", "layerwise", "token"]))
    normalization = "softmax_topk" if max(ks) == 1 else draw(st.sampled_from(["topk_softmax", "softmax_topk"]))
    expert = draw(st.sampled_from([d for d in (1, 2, 4, 8) if num_experts % d == 0]))
    micro = draw(st.integers(1, 8))
    return {"moe.num_experts": num_experts, "matryoshka.ks": ks, "matryoshka.strategy": strategy,
            "matryoshka.normalization": normalization, "matryoshka.eval_ks": [1, num_experts],
            "parallel.expert": expert, "train.micro_batch_size": micro,
            "train.global_batch_size": micro * draw(st.integers(1, 8))}


@settings(max_examples=150, deadline=None)
@given(changes=consistent_routing())
def test_consistent_multi_field_changes_are_never_refused(changes):
    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        section, key = path.split(".")
        data.setdefault(section, {})[key] = value
    cfg = to_dict(config_from_dict(data))
    for path, value in changes.items():
        section, key = path.split(".")
        assert cfg[section][key] == value
