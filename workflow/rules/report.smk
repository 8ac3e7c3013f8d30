rule report:
    """Tables and plots over every run listed in params.yaml `runs`."""
    input:
        results=[f"results/{m}_{d}.json" for m, d in RUNS],
        metrics=[f"metrics/train/{m}_{d}.json" for m, d in RUNS],
    output:
        html="reports/report.html",
        md="reports/report.md",
        figures=directory("reports/figures"),
    shell:
        "advtrain report"
