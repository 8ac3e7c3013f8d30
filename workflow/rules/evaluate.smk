rule evaluate:
    """Clean accuracy, PGD-k, CW-k and AutoAttack on the test set, for one seed's model."""
    input:
        model=pattern(paths.MODEL),
        meta=pattern(paths.PREPARED_META),
    output:
        result=pattern(paths.SEED_RESULT),
    params:
        evaluation=settings("evaluation"),
        dataset=settings("datasets", "{dataset}"),
        method=settings("methods", "{method}"),
    log:
        pattern(paths.LOG, stage="evaluate", name="{method}_{dataset}_seed{seed}"),
    threads: lambda wc: rank_threads(wc, evaluation=True)
    priority: longest_first
    resources:
        cpus_per_task=lambda wc, threads: threads,  # on a cluster: the threads asked for
        **job_resources("evaluate", evaluation=True),
    shell:
        "advtrain --log {log} evaluate {wildcards.method} {wildcards.dataset} --seed {wildcards.seed}"


rule aggregate:
    """A (method, dataset) over the seeds of runs.seeds: mean, std and 95% intervals (results/METHOD_DATASET.json), and
    the headline numbers DVC shows (metrics/METHOD_DATASET.json)."""
    input:
        results=lambda wc: [str(paths.seed_result_path(wc.method, wc.dataset, s)) for s in SEEDS],
    output:
        result=pattern(paths.RESULT),
        metrics=pattern(paths.METRICS),
    log:
        pattern(paths.LOG, stage="aggregate", name="{method}_{dataset}"),
    resources:
        **SMALL,
    shell:
        "advtrain --log {log} aggregate {wildcards.method} {wildcards.dataset}"
