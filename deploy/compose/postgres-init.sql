-- Run by the postgres image once, when its data volume is first initialised: MLflow's own database next to
-- the job store's (POSTGRES_DB=rcm). Both belong to the one user of the compose stack.
CREATE DATABASE mlflow;
