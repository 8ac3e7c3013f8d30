"""advtrain: efficient adversarial training, evaluated with AutoAttack, under Snakemake, DVC and MLflow."""

__version__ = "0.1.0"
