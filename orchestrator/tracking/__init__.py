"""Tracking in MLflow: the store (`store`), the job's one writer (`run_logger`), released
generators (`release`) and sample figures (`samples`). System metrics are sampled by
ganray.workers.system_metrics (the coordinator's machine and every worker's node alike)."""
