-- One Postgres, three databases: MLflow's runs and registry, MLflow's users (basic-auth app), Prefect's.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
