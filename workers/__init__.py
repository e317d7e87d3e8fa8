"""Ray Train glue (job spec -> rcm_core); arrives with the service issue. Imports rcm_core and ray only."""
