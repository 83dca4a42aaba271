-- One Postgres, two databases: MLflow's and Prefect's.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
