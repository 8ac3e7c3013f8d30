# Shared by the rules: the configured runs and the wildcard constraints.
import json

METHODS = sorted(config.get("methods", {}))
DATASETS = sorted(config.get("datasets", {}))
RUNS = [(m, d) for d in config["runs"]["datasets"] for m in config["runs"]["methods"]]


wildcard_constraints:
    method="[a-z0-9]+",
    dataset="[a-z0-9]+",


def settings(*keys):
    """A params.yaml sub-tree as a JSON string: a rule whose `params` change is rerun by Snakemake."""

    def get(wildcards):
        node = config
        for k in keys:
            k = k.format(**wildcards)
            node = node.get(k, {}) if isinstance(node, dict) else {}
        return json.dumps(node, sort_keys=True)

    return get
