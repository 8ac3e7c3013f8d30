def train_inputs(wildcards):
    prepared = paths.prepared_dir(wildcards.dataset)
    inputs = {"train": f"{prepared}/train.pt", "meta": f"{prepared}/meta.json"}
    if needs_teacher(wildcards):  # a teacher-based method learns from its pretrained teacher
        inputs["teacher"] = str(paths.teacher_path(wildcards.method, wildcards.dataset))
    return inputs


TRAIN_SETTINGS = dict(
    seed=settings("seed"),
    training=settings("training"),
    dataset=settings("datasets", "{dataset}"),
    method=settings("methods", "{method}"),
    models=settings("models"),
)


rule pretrain:
    """Clean training of the teacher a teacher-based method learns from (its teacher_recipe: model, epochs)."""
    input:
        train=pattern(paths.PREPARED) + "/train.pt",
        meta=pattern(paths.PREPARED) + "/meta.json",
    output:
        model=pattern(paths.TEACHER),
        metrics=pattern(paths.TEACHER_METRICS),
    params:
        **TRAIN_SETTINGS,
    log:
        pattern(paths.LOG, stage="pretrain", name="{method}_{dataset}"),
    threads: workflow.cores
    shell:
        "advtrain --log {log} pretrain {wildcards.method} {wildcards.dataset}"


rule train:
    """Adversarial training of one method on one dataset. Resumes from its checkpoint (paths.CHECKPOINT)."""
    input:
        unpack(train_inputs),
    output:
        model=pattern(paths.MODEL),
        metrics=pattern(paths.TRAIN_METRICS),
    params:
        **TRAIN_SETTINGS,
    log:
        pattern(paths.LOG, stage="train", name="{method}_{dataset}"),
    threads: workflow.cores  # one training at a time: it uses every core (or the one GPU)
    shell:
        "advtrain --log {log} train {wildcards.method} {wildcards.dataset}"
