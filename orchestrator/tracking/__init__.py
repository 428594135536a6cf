"""Tracking in MLflow: the store (`store`), the job's one writer (`run_logger`), released
generators (`release`), sample figures (`samples`) and system metrics (`system_metrics`)."""
