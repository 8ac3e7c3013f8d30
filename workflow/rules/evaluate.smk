rule evaluate:
    """Clean accuracy, PGD-k, CW-k and AutoAttack on the test set."""
    input:
        model=pattern(paths.MODEL),
        test=pattern(paths.PREPARED) + "/test.pt",
        meta=pattern(paths.PREPARED) + "/meta.json",
    output:
        result=pattern(paths.RESULT),
    params:
        evaluation=settings("evaluation"),
        dataset=settings("datasets", "{dataset}"),
        method=settings("methods", "{method}"),
    log:
        pattern(paths.LOG, stage="evaluate", name="{method}_{dataset}"),
    threads: workflow.cores
    shell:
        "advtrain --log {log} evaluate {wildcards.method} {wildcards.dataset}"
