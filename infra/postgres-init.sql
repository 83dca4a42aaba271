-- One Postgres, three databases: MLflow's runs and registry, MLflow's users (basic-auth app), Prefect's.
-- The listening votes' database and role: postgres-listening.sh (its password comes from the environment).
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
CREATE DATABASE prefect;
