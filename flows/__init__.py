"""radflow orchestration: Prefect flows, MLflow/DVC edges and the command line."""
