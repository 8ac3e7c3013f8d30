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


# The data-parallel settings together, where they meet: a last minibatch of fewer images than training.devices
# (a rank with an empty shard) must be refused in one line for a source of known size, and any other combination
# accepted or refused in one line. Mostly in range (so that both answers come up), sometimes not a number at all.
devices = st.one_of(st.integers(1, 8), st.integers(-2, 0), st.sampled_from([None, 2.0, "2", True]))
batch_sizes = st.one_of(st.integers(1, 300), st.sampled_from([0, -5, None, "128", 12.5]))
subsets = st.one_of(st.integers(500, 3000), st.integers(0, 70000), st.sampled_from([-1, None, "1000"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(devices=devices, batch_size=batch_sizes, train_subset=subsets, where=st.sampled_from(["training", "dataset"]))
@example(devices=2, batch_size=100, train_subset=1001, where="dataset")  # the issue's: 1001 images on 2 ranks
def test_data_parallel_settings_are_accepted_or_refused_in_one_line(devices, batch_size, train_subset, where):
    from advtrain.methods import METHODS

    raw = copy.deepcopy(BASE)
    node = raw["training"] if where == "training" else raw["datasets"]["fashionmnist"]["training"]
    node.update({"devices": devices, "batch_size": batch_size, "train_subset": train_subset})
    try:
        params = Params(raw)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith("params.yaml: "), msg
        return
    for method, dataset in params.runs:  # accepted: no run leaves a rank an empty shard of its last minibatch
        cfgs = [params.resolve(method, dataset)]
        if METHODS[method].needs_teacher:
            cfgs.append(params.teacher_config(method, dataset))
        for cfg in cfgs:
            tr, sizes = cfg.training, params.source(dataset).sizes
            n = min(tr["train_subset"], sizes["train"]) if tr["train_subset"] else sizes["train"]
            held = max(METHODS[cfg.method].held_out(cfg.method_params), tr["val_points"])
            last = (n - held) % tr["batch_size"]
            assert not 0 < last < tr["devices"], (cfg.name, n, held, tr)
