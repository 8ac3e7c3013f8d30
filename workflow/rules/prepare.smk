rule prepare:
    """Fetch the dataset's source (system copy, download or files in place), verify checksums, store uint8 tensors
    (or, for a streamed source, resized shards). meta.json, written last, stands for the folder."""
    output:
        meta=pattern(paths.PREPARED_META),
    params:
        source=settings("datasets", "{dataset}", "source"),
    log:
        pattern(paths.LOG, stage="prepare", name="{dataset}"),
    threads: lambda wc: resources.prepare_job(PARAMS.source(wc.dataset))[0]
    resources:
        cpus_per_task=lambda wc, threads: threads,
        mem_mb=prepare_resources("mem_mb"),
        runtime=prepare_resources("runtime"),
    shell:
        "advtrain --log {log} prepare {wildcards.dataset}"
