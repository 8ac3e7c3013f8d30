rule report:
    """Tables and plots over every run listed in params.yaml `runs`."""
    input:
        results=[str(paths.result_path(m, d)) for m, d in RUNS],
        metrics=[str(paths.train_metrics_path(m, d, SEEDS[0])) for m, d in RUNS],
    output:
        html=f"{paths.REPORT_DIR}/report.html",
        md=f"{paths.REPORT_DIR}/report.md",
        figures=directory(f"{paths.REPORT_DIR}/figures"),
    log:
        pattern(paths.LOG, stage="report", name="report"),
    resources:
        **SMALL,
    shell:
        "advtrain --log {log} report"
