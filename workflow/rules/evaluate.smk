rule evaluate:
    """Clean accuracy, PGD-k and AutoAttack on the test set."""
    input:
        model="models/{method}_{dataset}.pt",
        test="data/prepared/{dataset}/test.pt",
        meta="data/prepared/{dataset}/meta.json",
    output:
        result="results/{method}_{dataset}.json",
    params:
        evaluation=settings("evaluation"),
        dataset=settings("datasets", "{dataset}"),
        method=settings("methods", "{method}"),
    threads: workflow.cores
    shell:
        "advtrain evaluate {wildcards.method} {wildcards.dataset}"
