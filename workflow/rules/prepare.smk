rule prepare:
    """Fetch the dataset's source (system copy, download or files in place), verify checksums, store uint8 tensors
    (or, for a streamed source, resized shards). meta.json, written last, stands for the folder."""
    output:
        meta=pattern(paths.PREPARED_META),
    params:
        source=settings("datasets", "{dataset}", "source"),
    log:
        pattern(paths.LOG, stage="prepare", name="{dataset}"),
    resources:
        **SMALL,
    shell:
        "advtrain --log {log} prepare {wildcards.dataset}"
