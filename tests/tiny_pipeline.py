"""The tiny pipeline several test modules run end to end: 256 builtin training rows (96 real,
160 synthetic) in 64-row shards and 16 real validation rows, one short epoch, a few DeepFool and
PGD steps, training in-process. Each module adds its own name, tracking and whatever it varies
(`--set` values; a later one wins)."""

# everything but the margin model: a module that passes its own checkpoint leaves it out
TINY_STAGES = [
    "data.sources=[{type: builtin, real_train: 112, real_test: 64, synthetic: 160}]",
    "data.validation=16",
    "data.rows_per_shard=64",
    "training.epochs=1",
    "training.batch_size=32",
    "training.attack.steps=1",
    "scoring.max_iter=5",
    "scoring.batch_size=64",
    "pruning.ratio=0.25",
    "evaluation.subset=32",
    "evaluation.pgd_steps=2",
    "evaluation.batch_size=32",
    "ray.num_workers=0",
]
TINY_MARGIN_MODEL = [
    "margin_model.checkpoint=null",  # train one (the demo's packaged model is for its data)
    "margin_model.train.epochs=1",
    "margin_model.train.batch_size=32",
    "margin_model.train.attack.steps=1",
]
TINY = TINY_STAGES + TINY_MARGIN_MODEL
