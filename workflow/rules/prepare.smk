rule prepare:
    """Fetch the dataset's source (system copy, download or files in place), verify checksums, store uint8 tensors."""
    output:
        train=pattern(paths.PREPARED) + "/train.pt",
        test=pattern(paths.PREPARED) + "/test.pt",
        meta=pattern(paths.PREPARED) + "/meta.json",
    params:
        source=settings("datasets", "{dataset}", "source"),
    log:
        pattern(paths.LOG, stage="prepare", name="{dataset}"),
    resources:
        **SMALL,
    shell:
        "advtrain --log {log} prepare {wildcards.dataset}"
