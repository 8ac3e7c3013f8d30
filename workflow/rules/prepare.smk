rule prepare:
    """Fetch (system copy or torchvision download), verify checksums, store uint8 tensors + meta.json."""
    output:
        train="data/prepared/{dataset}/train.pt",
        test="data/prepared/{dataset}/test.pt",
        meta="data/prepared/{dataset}/meta.json",
    shell:
        "advtrain prepare {wildcards.dataset}"
