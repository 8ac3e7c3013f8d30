def train_inputs(wildcards):
    inputs = {"train": f"data/prepared/{wildcards.dataset}/train.pt",
              "meta": f"data/prepared/{wildcards.dataset}/meta.json"}
    if wildcards.method == "dynat":  # DYNAT's student learns from the pretrained teacher
        inputs["teacher"] = f"models/teacher_{wildcards.dataset}.pt"
    return inputs


rule pretrain:
    """Clean training of DYNAT's teacher (methods.dynat.teacher_epochs; 0 = the reference's from-scratch teacher)."""
    input:
        train="data/prepared/{dataset}/train.pt",
        meta="data/prepared/{dataset}/meta.json",
    output:
        model="models/teacher_{dataset}.pt",
        metrics="metrics/train/teacher_{dataset}.json",
    params:
        seed=settings("seed"),
        training=settings("training"),
        dataset=settings("datasets", "{dataset}"),
        method=settings("methods", "dynat"),
        models=settings("models"),
    threads: workflow.cores
    shell:
        "advtrain pretrain {wildcards.dataset}"


rule train:
    """Adversarial training of one method on one dataset. Resumes from checkpoints/{method}_{dataset}.pt."""
    input:
        unpack(train_inputs),
    output:
        model="models/{method}_{dataset}.pt",
        metrics="metrics/train/{method}_{dataset}.json",
    params:
        seed=settings("seed"),
        training=settings("training"),
        dataset=settings("datasets", "{dataset}"),
        method=settings("methods", "{method}"),
        models=settings("models"),
    threads: workflow.cores  # one training at a time: it uses every core (or the one GPU)
    shell:
        "advtrain train {wildcards.method} {wildcards.dataset}"
