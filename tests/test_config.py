"""params.yaml validation: a bad value gets one clear line naming the key; the repo's own file is valid."""
import pytest
import yaml

from advtrain.config import ConfigError, Params
from conftest import ROOT


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_are_valid_and_resolve():
    p = Params(base())
    cfg = p.resolve("pgd", "fashionmnist")
    assert cfg.eps == 0.1 and cfg.method_params["steps"] == 5  # the per-dataset override
    cifar = p.resolve("pgd", "cifar10")
    assert cifar.eps == pytest.approx(8 / 255) and cifar.method_params["steps"] == 10
    assert cifar.training["epochs"] == 200 and cifar.training["momentum"] == 0.9  # dataset override + defaults


@pytest.mark.parametrize("path, value, needle", [
    (("training", "lr"), -0.1, "training.lr must be a number > 0"),
    (("datasets", "fashionmnist", "eps"), -0.1, "datasets.fashionmnist.eps must be a number > 0"),
    (("datasets", "fashionmnist", "eps"), 1.5, "datasets.fashionmnist.eps"),
    (("datasets", "cifar10", "eps"), "8/0", "datasets.cifar10.eps"),
    (("training", "epochs"), 2.5, "training.epochs must be an integer"),
    (("training", "lr"), float("inf"), "training.lr must be a finite number > 0"),
    (("datasets", "cifar10", "alpha"), "1e400/1", "datasets.cifar10.alpha"),
    (("training", "schedule"), "cosine", "training.schedule must be one of"),
    (("training", "lrr"), 0.1, "unknown key 'training.lrr'"),
    (("methods", "pgd", "fraction"), 1.2, "methods.pgd.fraction"),
    (("runs", "methods"), ["pgd", "madry"], "runs.methods[1] must be one of"),
    (("datasets", "cifar10", "model"), "small_cnn", "does not fit cifar10"),  # not even in `runs`
    (("datasets", "cifar10", "model"), "resnet500", "datasets.cifar10.model must be one of"),
    (("models", "wide_resnet", "depth"), 30, "models.wide_resnet.depth must be 6n+4"),
    (("datasets", "cifar10", "source"), "cifar-10", "datasets.cifar10.source must be one of fashionmnist, cifar10, "
                                                    "cifar100, imagefolder, imagenet (the data sources)"),
    (("datasets", "cifar10", "augment"), {"resized_crop": [0.08, 1]}, "datasets.cifar10.augment.resized_crop needs a "
                                                                      "streamed source (imagefolder, imagenet)"),
    (("datasets", "cifar10", "augment"), {"resized_crop": [0.5, 0.1]}, "datasets.cifar10.augment.resized_crop must "
                                                                       "be [lo, hi] with 0 < lo <= hi <= 1"),
    (("datasets", "fashionmnist", "model"), "lenet", "datasets.fashionmnist.model must be one of small_cnn, "
                                                     "preact_resnet18, wide_resnet, resnet50"),
    (("methods", "dynat", "teacher_model"), "resnet", "methods.dynat.teacher_model must be one of small_cnn"),
    (("runs", "methods"), ["pgd", "dynat"], "runs.methods: dynat learns from a pretrained teacher: list it under "
                                            "runs.teacher_methods"),
    # a source of known size: the last minibatch of 1,001 training images (1,002 less 1 held out) in batches of 100
    # would leave one of the two ranks an empty shard
    (("datasets", "fashionmnist", "training"), {"devices": 2, "train_subset": 1002, "val_points": 1, "batch_size": 100},
     "the last minibatch would hold 1 of the 1001 training images, fewer than the 2 ranks of training.devices"),
])
def test_invalid_values_name_the_key(path, value, needle):
    raw = base()
    node = raw
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError) as e:
        Params(raw)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_fractions_are_accepted():
    raw = base()
    raw["datasets"]["cifar10"]["eps"] = "16/255"
    assert Params(raw).resolve("pgd", "cifar10").eps == pytest.approx(16 / 255)


@pytest.mark.parametrize("name", ["fashion/mnist", "../../evil", ".hidden", "a b"])
def test_a_dataset_name_that_is_no_safe_file_name_is_refused(name):
    raw = base()
    raw["datasets"][name] = raw["datasets"]["fashionmnist"]
    with pytest.raises(ConfigError) as e:
        Params(raw)
    msg = str(e.value)
    assert f"datasets.{name}: {name!r} is not a usable name: it names files and folders" in msg and "\n" not in msg


@pytest.mark.parametrize("key, value", [("methods", ["pgd", "standard", "pgd"]), ("datasets", ["fashionmnist"] * 2),
                                        ("teacher_methods", ["dynat", "dynat"])])
def test_a_run_listed_twice_is_refused(key, value):
    raw = base()
    raw["runs"][key] = value
    with pytest.raises(ConfigError, match=rf"runs\.{key} must be a list of distinct .* \(one is listed twice\)"):
        Params(raw)


def test_yaml_merge_keys_are_accepted_and_real_duplicates_refused(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    fm = "    evaluation: {n_points: 500, autoattack: fast}\n"
    assert text.count(fm) == 1 and text.count("    training: {epochs: 200}\n  cifar100:") == 1
    # CIFAR-10's evaluation merged from Fashion-MNIST's anchor, one key overridden beside the merge
    text = text.replace(fm, "    evaluation: &fmeval {n_points: 500, autoattack: fast}\n").replace(
        "    training: {epochs: 200}\n  cifar100:",
        "    training: {epochs: 200}\n    evaluation: {<<: *fmeval, n_points: 200}\n  cifar100:")
    (tmp_path / "params.yaml").write_text(text)
    ev = Params.load(tmp_path / "params.yaml").data["datasets"]["cifar10"]["evaluation"]
    assert ev == {"n_points": 200, "autoattack": "fast"}
    (tmp_path / "dup.yaml").write_text(text.replace("{<<: *fmeval, n_points: 200}",
                                                    "{<<: *fmeval, n_points: 200, n_points: 100}"))
    with pytest.raises(ConfigError, match=r"key 'n_points' is given twice"):
        Params.load(tmp_path / "dup.yaml")


def test_a_dataset_removed_but_still_listed_in_runs_names_the_runs():
    raw = base()
    del raw["datasets"]["fashionmnist"]  # methods.*.fashionmnist overrides stay behind
    with pytest.raises(ConfigError) as e:
        Params(raw)
    msg = str(e.value)
    assert msg.startswith("params.yaml: runs.datasets: unknown dataset 'fashionmnist' (configured under datasets: "), \
        msg
    assert "add datasets.fashionmnist" in msg and "methods." not in msg, msg
