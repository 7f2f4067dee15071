"""The Ray Train and DeepSpeed wiring every training job shares: config sections and checkpoints
(:mod:`.common`), the trainer and where runs are stored (:mod:`.ray_job`), DeepSpeed engines
(:mod:`.deepspeed_engine`), per-step schedules (:mod:`.schedules`), validation retrieval metrics
(:mod:`.validation`), TensorBoard scalars (:mod:`.scalars`) and the console's progress displays
(:mod:`.progress`). The task packages (ssl, metric_learning,
fusion, attributes) build their loops on it; it imports none of them."""
