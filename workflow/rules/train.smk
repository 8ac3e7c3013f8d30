rule train:
    """Adversarial training of one method on one dataset. Resumes from checkpoints/{method}_{dataset}.pt."""
    input:
        train="data/prepared/{dataset}/train.pt",
        meta="data/prepared/{dataset}/meta.json",
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
