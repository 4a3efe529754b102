-- One PostgreSQL for the team services: a database (and owner) each for MLflow and Prefect.
-- Runs once, when the data volume is first created.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
