"""A fake of `service.cluster.Cluster` for the API unit tests: no Ray, MLflow or S3."""

from service.cluster import ClusterJobStatus


class FakeCluster:
    """Records calls; Ray job status and MLflow progress are set by the test."""

    def __init__(self):
        self.submitted, self.cancelled, self.stopped = [], [], []
        self.ray_status: dict[str, ClusterJobStatus] = {}
        self.progress: dict[str, dict[str, float]] = {}
        self.run_statuses: dict[str, str] = {}
        self.fail_submit = False
        self.objects: dict[tuple[str, str], bytes] = {}  # (bucket, key) -> body: tenant inputs
        self.effective: dict[str, dict] = {}
        self.tasks: list[tuple[str, str, dict]] = []  # submit_task calls: (submission id, entrypoint, env)
        self.no_checkpoints: set[str] = set()  # job ids whose checkpoints() is empty

    def create_run(self, experiment, job_id, name):
        return f"run-{job_id}"

    def submit(self, job_id, spec, run_id):
        if self.fail_submit:
            import httpx

            raise httpx.ConnectError("ray down")
        self.submitted.append(job_id)
        self.ray_status[f"rcm-{job_id}"] = ClusterJobStatus("PENDING")
        return f"rcm-{job_id}"

    def submit_task(self, submission_id, entrypoint, env):
        if self.fail_submit:
            import httpx

            raise httpx.ConnectError("ray down")
        self.tasks.append((submission_id, entrypoint, env))
        self.ray_status[submission_id] = ClusterJobStatus("PENDING")
        return submission_id

    def status(self, submission_id):
        return self.ray_status[submission_id]

    def request_cancel(self, job_id):
        self.cancelled.append(job_id)

    def stop(self, submission_id):
        self.stopped.append(submission_id)

    def run_progress(self, run_id):
        return self.progress.get(run_id, {})

    def set_run_status(self, run_id, status):
        self.run_statuses[run_id] = status

    def run_url(self, run_id):
        return f"http://mlflow/#/runs/{run_id}"

    def checkpoints(self, job_id):
        if job_id in self.no_checkpoints:
            return []
        return [{"step": 50, "uri": f"s3://ckpt/ray/{job_id}/checkpoint_1"}]

    def put_input(self, bucket, key, body):
        self.objects[(bucket, key)] = body.read()

    def list_inputs(self, bucket, prefix):
        return [
            {"key": k, "size": len(v)}
            for (b, k), v in sorted(self.objects.items())
            if b == bucket and k.startswith(prefix)
        ]

    def delete_input(self, bucket, key):
        self.objects.pop((bucket, key), None)

    def read_input(self, bucket, key, max_bytes):
        body = self.objects.get((bucket, key))
        return None if body is None else body[: max_bytes + 1]

    def effective_config(self, job_id):
        return self.effective.get(job_id)

    def healthy(self):
        return {"ray": True, "mlflow": True, "s3": True}
