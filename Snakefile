# Snakemake front end of the pipeline. dvc.yaml runs the SAME commands on the SAME paths (tests keep the two in step).
#   snakemake --cores 2                                        every run in params.yaml `runs`, and the report
#   snakemake --cores 8 results/pgd_cifar10.json               one (method, dataset), end to end
#   snakemake --cores 2 --configfile tests/configs/tiny.yaml   the tiny test configuration (seconds per stage)
# params.yaml is validated when this file loads: a bad value stops here, before anything is scheduled or deleted.

include: "workflow/rules/common.smk"
include: "workflow/rules/prepare.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        "reports/report.html",
    default_target: True
