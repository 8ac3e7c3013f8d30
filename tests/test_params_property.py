"""Property-based: mutate a valid params.yaml at random; every mutation is either accepted or refused with ONE line
naming a key (a ConfigError), never another exception."""
import copy

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from advtrain.config import ConfigError, Params
from conftest import ROOT

BASE = yaml.safe_load((ROOT / "params.yaml").read_text())


def paths(node, prefix=()):
    """Every key path of the nested mapping, leaves and sections alike."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from paths(v, prefix + (k,))


PATHS = list(paths(BASE))
values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["8/255", "1/0", "1e400/1", "auto", "cyclic", "pgd", "small_cnn", ""]),
    st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=values, new_key=st.booleans())
@example(path=("datasets", "imagenet", "source", "name"), value=[], new_key=False)  # once a TypeError (unhashable)
def test_every_mutation_is_accepted_or_refused_in_one_line(path, value, new_key):
    raw = copy.deepcopy(BASE)
    node = raw
    for k in path[:-1]:
        node = node[k]
    if new_key and isinstance(node.get(path[-1]), dict):
        node[path[-1]]["zz_unknown"] = value  # an unknown key inside a section
    else:
        node[path[-1]] = value
    try:
        Params(raw)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith("params.yaml: "), msg


VALID = {
    ("training", "lr"): st.floats(1e-6, 10),
    ("training", "epochs"): st.integers(1, 1000),
    ("training", "momentum"): st.floats(0, 0.99),
    ("datasets", "fashionmnist", "eps"): st.floats(1e-4, 1),
    ("datasets", "cifar10", "eps"): st.integers(1, 255).map(lambda k: f"{k}/255"),
    ("methods", "pgd", "steps"): st.integers(0, 50),
    ("methods", "pgd", "fraction"): st.floats(0, 1),
    ("methods", "deat", "gamma"): st.floats(0.5, 2),
    ("evaluation", "n_points"): st.one_of(st.none(), st.integers(1, 10000)),
    ("evaluation", "autoattack"): st.sampled_from(["standard", "fast", "off"]),
}


@settings(max_examples=150, deadline=None)
@given(data=st.data(), path=st.sampled_from(sorted(VALID)))
def test_every_valid_mutation_is_accepted(data, path):
    raw = copy.deepcopy(BASE)
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = data.draw(VALID[path])
    Params(raw)  # must not raise
