"""What MLflow holds of a trained model, on the real sqlite store of the tiny Snakemake project: the registered model
under its alias `evaluated` loads and reproduces its evaluation's clean accuracy, the prepared data is the run's input
with meta.json's sha256, system metrics were sampled while it trained, and the report's run names the training runs."""
import json

import mlflow
import mlflow.pytorch
import torch
from mlflow.tracking import MlflowClient

from advtrain.tracking import DIGEST_CHARS, EXPERIMENT_TAGS


def test_the_registered_model_reproduces_its_result_and_its_run_holds_data_and_system_metrics(snakemake_project):
    proj = snakemake_project
    db = f"sqlite:///{proj / 'mlruns.db'}"
    client = MlflowClient(db)
    version = client.get_model_version_by_alias("advtrain-pgd-fashionmnist", "evaluated")
    seed = int(version.tags["seed"])
    result = json.loads((proj / f"results/seeds/pgd_fashionmnist/seed{seed}.json").read_text())
    assert float(version.tags["robust_acc"]) == float(f"{result['robust_acc']:.6g}")  # the accuracy is on the version
    mlflow.set_tracking_uri(db)  # models:/ URIs resolve through MLflow's global tracking URI
    try:
        model = mlflow.pytorch.load_model("models:/advtrain-pgd-fashionmnist@evaluated")
        info = mlflow.models.get_model_info("models:/advtrain-pgd-fashionmnist@evaluated")
    finally:
        mlflow.set_tracking_uri(None)
    # the signature states the [0, 1] image contract: float32 (N, C, H, W) in, logits out
    spec = info.signature.inputs.inputs[0]
    assert spec.type == torch.zeros(0).numpy().dtype and spec.shape == (-1, 1, 28, 28), info.signature
    assert info.signature.outputs.inputs[0].shape == (-1, 10) and "[0, 1]" in info.metadata["input"]
    test = torch.load(proj / "data/prepared/fashionmnist/test.pt", weights_only=True)
    n = result["n_points"]
    with torch.no_grad():
        pred = model.eval()(test["images"][:n].float().div(255)).argmax(1)
    assert (pred == test["labels"][:n]).sum().item() == round(result["clean_acc"] * n)

    run = client.get_run(version.run_id)
    assert run.data.tags["run"] == f"pgd_fashionmnist_seed{seed}"
    meta = json.loads((proj / "data/prepared/fashionmnist/meta.json").read_text())
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    train = inputs["fashionmnist/train"]
    # MLflow caps a digest at 36 characters: the sha256's prefix is the digest, the whole one the input's tag
    assert train.dataset.digest == meta["sha256"]["train.pt"][:DIGEST_CHARS]
    assert {t.key: t.value for t in train.tags}["sha256"] == meta["sha256"]["train.pt"]
    assert inputs["fashionmnist/test"].dataset.digest == meta["sha256"]["test.pt"][:DIGEST_CHARS]
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system, sorted(run.data.metrics)

    # one version per trained seed of each (method, dataset): a republished run does not log its model again
    versions = client.search_model_versions("name = 'advtrain-pgd-fashionmnist'")
    assert sorted(client.get_run(v.run_id).data.tags["run"] for v in versions) == [
        "pgd_fashionmnist_seed0", "pgd_fashionmnist_seed1"]
    exp = client.get_experiment_by_name("advtrain")
    assert {k: exp.tags.get(k) for k in EXPERIMENT_TAGS} == EXPERIMENT_TAGS  # the UI opens on the runs table

    report = client.search_runs([exp.experiment_id], filter_string="tags.kind = 'report'")[0]
    training = {r.info.run_id: r.data.tags["run"] for r in client.search_runs(
        [exp.experiment_id], filter_string="tags.method = 'pgd'")}
    linked = report.data.tags["advtrain.training_runs"].split(",")
    assert {training[i] for i in linked if i in training} == {"pgd_fashionmnist_seed0", "pgd_fashionmnist_seed1"}
    assert report.data.params["training_run.pgd_fashionmnist_seed0"] in linked
    assert f"#/experiments/{exp.experiment_id}/runs/{version.run_id}" in report.data.tags["mlflow.note.content"]
