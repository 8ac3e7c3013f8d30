# Shared by the rules: the validated settings, the configured runs, the path patterns and the wildcard constraints.
import json
import os
import sys

from advtrain import paths
from advtrain.config import Params, merge
from advtrain.errors import UserError
from advtrain.methods import METHODS


def load_params():
    """params.yaml and any --configfile overlays, validated, as the `advtrain` jobs will read them."""
    files = ["params.yaml", *map(str, workflow.overwrite_configfiles)]
    try:
        params = Params.load(",".join(files))
        params.require_runs()
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    if merge(params.raw, config) != params.raw:  # config holds the --configfile overlays and any --config values
        sys.stderr.write("error: `snakemake --config` values do not reach the advtrain jobs: put them in params.yaml "
                         "or in a file given with --configfile\n")
        sys.exit(2)
    if len(files) > 1:
        os.environ["ADVTRAIN_PARAMS"] = ",".join(files)  # the jobs read the same merged settings
    return params


PARAMS = load_params()
config.update(PARAMS.raw)
RUNS = PARAMS.runs


wildcard_constraints:
    method="|".join(sorted(METHODS)),
    dataset="|".join(sorted(PARAMS.data["datasets"])),


def needs_teacher(wildcards):
    return METHODS[wildcards.method].needs_teacher


def settings(*keys):
    """A params.yaml sub-tree as a JSON string: a rule whose `params` change is rerun by Snakemake."""

    def get(wildcards):
        node = config
        for k in keys:
            k = k.format(**wildcards)
            node = node.get(k, {}) if isinstance(node, dict) else {}
        return json.dumps(node, sort_keys=True)

    return get


def pattern(template, **fixed):
    """A paths.py template as a Snakemake pattern: its {fields} become wildcards unless fixed here."""
    return template.format(**{k: fixed.get(k, "{" + k + "}") for k in ("method", "dataset", "stage", "name")})
