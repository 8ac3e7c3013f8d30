# Snakemake front end of the pipeline. dvc.yaml runs the SAME commands on the SAME paths (tests/test_workflow.py
# keeps the two in step). Targets:
#   snakemake --cores 2                                  every run in params.yaml `runs`, and the report
#   snakemake --cores 8 results/pgd_cifar10.json         one (method, dataset), end to end
#   snakemake --cores 2 reports/report.html              the report over the configured runs
configfile: "params.yaml"

include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "reports/report.html",
    default_target: True
