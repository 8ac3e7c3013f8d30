# Shared by the rules: the configured runs and the wildcard constraints.
import json

METHODS = sorted(config.get("methods", {}))
DATASETS = sorted(config.get("datasets", {}))
RUNS = [(m, d) for d in config["runs"]["datasets"] for m in config["runs"]["methods"]]
RUNS += [("dynat", d) for d in config["runs"].get("dynat", [])]  # DYNAT: pretrain -> train -> evaluate


wildcard_constraints:
    method="|".join(METHODS),  # only configured methods: models/teacher_{dataset}.pt is pretrain's
    dataset="|".join(DATASETS),


def settings(*keys):
    """A params.yaml sub-tree as a JSON string: a rule whose `params` change is rerun by Snakemake."""

    def get(wildcards):
        node = config
        for k in keys:
            k = k.format(**wildcards)
            node = node.get(k, {}) if isinstance(node, dict) else {}
        return json.dumps(node, sort_keys=True)

    return get
