def train_inputs(wildcards):
    inputs = {"meta": str(paths.PREPARED_META.format(dataset=wildcards.dataset))}
    if needs_teacher(wildcards):  # a teacher-based method learns from its pretrained teacher
        inputs["teacher"] = str(paths.teacher_path(wildcards.method, wildcards.dataset, wildcards.seed))
    return inputs


TRAIN_SETTINGS = dict(
    training=settings("training"),
    dataset=settings("datasets", "{dataset}"),
    method=settings("methods", "{method}"),
    models=settings("models"),
)


rule pretrain:
    """Clean training of the teacher a teacher-based method learns from (its teacher_recipe: model, epochs)."""
    input:
        meta=pattern(paths.PREPARED_META),
    output:
        model=pattern(paths.TEACHER),
        metrics=pattern(paths.TEACHER_METRICS),
    params:
        **TRAIN_SETTINGS,
    log:
        pattern(paths.LOG, stage="pretrain", name="{method}_{dataset}_seed{seed}"),
    threads: lambda wc: rank_threads(wc, teacher=True)
    priority: longest_first
    resources:
        cpus_per_task=lambda wc, threads: threads,  # on a cluster: the threads asked for
        **job_resources("train", teacher=True),
    shell:
        "advtrain --log {log} pretrain {wildcards.method} {wildcards.dataset} --seed {wildcards.seed}"


rule train:
    """Adversarial training of one method on one dataset with one seed. Resumes from its checkpoint."""
    input:
        unpack(train_inputs),
    output:
        model=pattern(paths.MODEL),
        metrics=pattern(paths.TRAIN_METRICS),
    params:
        **TRAIN_SETTINGS,
    log:
        pattern(paths.LOG, stage="train", name="{method}_{dataset}_seed{seed}"),
    threads: rank_threads
    priority: longest_first
    resources:
        cpus_per_task=lambda wc, threads: threads,  # on a cluster: the threads asked for
        **job_resources("train"),
    shell:
        "advtrain --log {log} train {wildcards.method} {wildcards.dataset} --seed {wildcards.seed}"
