"""The speed benchmark (issue #7) and what its speed-ups must not change: the model's function, attack strength."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from advtrain.attacks import pgd, predict
from advtrain.models import build_model
from advtrain.prepared import load_split, prepare
from advtrain.sources import SOURCES
from conftest import ROOT, env

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402  (benchmarks/bench.py: the harness lives outside the installed package)


def test_bench_tiny_smoke(tmp_path):
    """The whole benchmark at --size tiny on the CPU: every method of both configurations, with positive figures."""
    out = tmp_path / "bench.json"
    # one thread: with other load on a 2-core machine, two OpenMP threads can spin for minutes at their barriers
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench.py"), "--size", "tiny", "--device", "cpu", "--threads", "1",
                        "--out", str(out)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ours img/s" in p.stdout  # the table
    res = json.loads(out.read_text())
    assert res["peak"]["peak_flops"] > 0 and res["peak"]["denominator"] in ("fp32", "bf16")
    assert set(res["results"]) == set(bench.CONFIGS)
    for dataset, methods in res["results"].items():
        assert list(methods) == list(bench.METHODS), dataset
        for method, r in methods.items():
            assert "error" not in r, (dataset, method, r.get("error"))
            assert r["ratio"] > 0
            for loop in ("ours", "reference"):
                f = r[loop]
                for key in ("images_per_s", "passes_per_s", "flops_per_s", "fraction_of_peak"):
                    assert f[key] > 0, (dataset, method, loop, key, f[key])
                assert f["peak_mem_mb"] is None or f["peak_mem_mb"] >= 0
            # the same algorithm: the same forward/backward passes per minibatch, as the method table says
            _, attack, train = bench.METHODS[method][2]
            assert r["ours"]["passes_per_batch"] == pytest.approx(attack + train)
            assert r["reference"]["passes_per_batch"] == pytest.approx(attack + train)


def test_small_cnn_pools_before_relu_without_changing_the_function():
    """The small CNN pools before its ReLUs (faster); the seed order (ReLU, then pool) gives the same logits and the
    same input gradients, and the parameter names are unchanged, so older model files still load."""
    torch.manual_seed(0)
    model = build_model("small_cnn", (1, 28, 28), 10, (0.5,), (0.5,))
    names = [k for k, _ in model.named_parameters()]
    assert names == ["net.features.0.weight", "net.features.0.bias", "net.features.3.weight", "net.features.3.bias",
                     "net.classifier.1.weight", "net.classifier.1.bias", "net.classifier.3.weight",
                     "net.classifier.3.bias"]
    x = torch.rand(32, 1, 28, 28, requires_grad=True) - 0.25  # negative inputs too: pre-activations of both signs
    out = model(x)
    grad, = torch.autograd.grad(out.square().sum(), x)
    seed = bench.seed_order(model)
    assert isinstance(seed.net.features[1], torch.nn.ReLU)  # the order really changed
    out2 = seed(x)
    grad2, = torch.autograd.grad(out2.square().sum(), x)
    assert torch.equal(out, out2) and torch.equal(grad, grad2)


@pytest.fixture
def one_thread():
    """One intra-op thread: with other load on a 2-core machine, two OpenMP threads can spin at their barriers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bf16_autocast_does_not_weaken_pgd(tmp_path, one_thread):
    """PGD-10 crafted under bf16 autocast is as strong as in fp32: on 2,000 Fashion-MNIST test points of a briefly
    adversarially trained small CNN (robust accuracy mid-range, where a weaker attack would show), the accuracies
    under attack agree within 1 point. Both attacks start from the same random points; predictions are in fp32."""
    prepare(SOURCES["fashionmnist"](), tmp_path / "fm", tmp_path / "raw")
    x_train, y_train, _ = load_split(tmp_path / "fm", "train")
    x_test, y_test, _ = load_split(tmp_path / "fm", "test")
    torch.manual_seed(0)
    model = build_model("small_cnn", (1, 28, 28), 10, (0.2860,), (0.3530,), width=8, hidden=32, kernel=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    eps = 0.1
    for i in range(0, 6400, 128):  # PGD-3 adversarial training on 6,400 images
        x, y = x_train[i:i + 128].float() / 255, y_train[i:i + 128]
        x_adv = pgd(model.eval(), x, y, eps, eps / 4, 3)
        loss = F.cross_entropy(model.train()(x_adv), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = x_test[:2000].float() / 255, y_test[:2000]
    clean = (predict(model, x) == y).float().mean().item()
    acc = {}
    for name, autocast in (("fp32", None), ("bf16", lambda: torch.autocast("cpu", dtype=torch.bfloat16))):
        torch.manual_seed(1)
        kw = {"autocast": autocast} if autocast else {}
        x_adv = torch.cat([pgd(model, x[i:i + 500], y[i:i + 500], eps, eps / 4, 10, **kw) for i in range(0, len(y), 500)])
        assert (x_adv - x).abs().max() <= eps + 1e-6
        acc[name] = (predict(model, x_adv) == y).float().mean().item()
    assert 0.2 < acc["fp32"] < clean - 0.05, (clean, acc)  # a model where attack strength shows
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.01, acc
