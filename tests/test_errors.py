"""Bad input through the real command line: one clear line on stderr (no traceback), exit code 2, nothing lost."""
import shutil
import subprocess

import yaml

from conftest import BIN, FASHION, ROOT, env, make_project, run
from imagefolder_data import make_image_folder


def _cli(proj, *args):
    return run([str(BIN / "advtrain"), *args], proj, check=False)


def _one_clear_line(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_corrupt_prepared_file_is_refused(prepared, tmp_path):
    proj = tmp_path / "p"
    shutil.copytree(prepared, proj)
    train = proj / "data/prepared/fashionmnist/train.pt"
    train.write_bytes(train.read_bytes()[:1000])  # truncated
    p = _cli(proj, "train", "pgd", "fashionmnist")
    _one_clear_line(p, "train.pt: corrupt", "advtrain prepare fashionmnist")
    assert (proj / "data/prepared/fashionmnist/test.pt").exists()  # nothing else touched


def test_corrupt_source_archive_is_refused(tmp_path):
    src = tmp_path / "fmnist"
    shutil.copytree(FASHION, src)
    data = (src / "t10k-labels-idx1-ubyte.gz").read_bytes()
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(data[: len(data) // 2])  # a truncated download
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")  # prepare reads the dataset's source from it
    e = env()
    e["ADVTRAIN_FASHIONMNIST_DIR"] = str(src)
    p = subprocess.run([str(BIN / "advtrain"), "prepare", "fashionmnist", "--out", str(tmp_path / "out")],
                       cwd=tmp_path, env=e, capture_output=True, text=True)
    _one_clear_line(p, "t10k-labels-idx1-ubyte.gz", "corrupt")
    assert not (tmp_path / "out" / "meta.json").exists()  # no half-prepared folder a later stage could take


def test_invalid_parameter_and_unknown_method(prepared, tmp_path):
    proj = tmp_path / "p"
    shutil.copytree(prepared, proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["training"]["lr"] = -1
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    _one_clear_line(_cli(proj, "train", "pgd", "fashionmnist"), "training.lr must be a number > 0")
    params["training"]["lr"] = 0.1
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    _one_clear_line(_cli(proj, "train", "madry", "fashionmnist"), "unknown method 'madry'", "known:")
    _one_clear_line(_cli(proj, "evaluate", "pgd", "fashionmnist"), "models/pgd_fashionmnist_seed0.pt", "train it first")


def test_evaluation_refuses_a_teacher_only_checkpoint(prepared, tmp_path):
    proj = tmp_path / "p"
    shutil.copytree(prepared, proj)
    run([str(BIN / "advtrain"), "pretrain", "dynat", "fashionmnist"], proj)
    teacher = (proj / "models/teachers/dynat_fashionmnist_seed0.pt").read_bytes()
    (proj / "models/dynat_fashionmnist_seed0.pt").write_bytes(teacher)
    _one_clear_line(_cli(proj, "evaluate", "dynat", "fashionmnist"), "holds a teacher, not a trained model")


def test_an_empty_class_folder_gets_one_line(tmp_path):
    proj = make_project(tmp_path / "p", yaml.safe_load((ROOT / "tests/configs/imagefolder.yaml").read_text()))
    make_image_folder(proj / "data/raw/shapes", n_train=16, n_test=8)
    (proj / "data/raw/shapes/train/class9").mkdir()  # torchvision: a 25-line FileNotFoundError traceback
    _one_clear_line(_cli(proj, "prepare", "shapes"), "data/raw/shapes/train/class9: no images (extensions .jpg",
                    "put the class's images there, or remove the empty folder")
    assert not (proj / "data/prepared/shapes/meta.json").exists()


def test_a_text_file_given_as_a_model_gets_one_line(tmp_path):
    proj = make_project(tmp_path / "p")
    for name, text in (("notes.txt", "a b c d e f g\n"), ("table.csv", "abc,def\n1,2\n"), ("x.json", '{"a": 1}')):
        (proj / name).write_text(text)  # each once a traceback of the weights-only unpickler (IndexError, KeyError)
        _one_clear_line(_cli(proj, "evaluate", "--model", name, "--arch", "small_cnn", "fashionmnist"),
                        f"{name}: a text file, not a checkpoint (torch.save's format)")


def test_an_unsafe_name_for_a_model_trained_elsewhere_gets_one_line(tmp_path):
    proj = make_project(tmp_path / "p")
    _one_clear_line(_cli(proj, "evaluate", "--model", "m.pt", "--arch", "small_cnn", "--name", "../evil",
                         "fashionmnist"), "--name '../evil': it names results/NAME_fashionmnist.json")
