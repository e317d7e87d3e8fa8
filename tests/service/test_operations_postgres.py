"""The operations table (migration 0003) on a real PostgreSQL server: a sample request and a dataset preparation
stored, followed to SUCCEEDED and read back (tests/service/test_postgres_store.py's server and app)."""

import json

from fastapi.testclient import TestClient

from service.cluster import ClusterJobStatus
from tests.service import test_postgres_store
from tests.service.test_operations_api import DATASET, SHAPES

postgres = test_postgres_store.postgres
app_on_postgres = test_postgres_store.app_on_postgres


def test_sample_and_dataset_requests_on_postgres(app_on_postgres):
    from service import crud

    app, cluster = app_on_postgres
    with TestClient(app) as client:
        with app.state.sessionmaker() as s:
            assert s.get_bind().dialect.name == "postgresql"
            token = crud.create_token(s, "tenant-a")
        h = {"Authorization": f"Bearer {token}"}
        job = client.post("/v1/jobs", json=SHAPES, headers=h).json()
        cluster.effective[job["id"]] = {"teacher": {"uri": "builtin:shapes"}}
        r = client.post(f"/v1/jobs/{job['id']}/samples", json={"prompts": ["a photo of a red circle"]}, headers=h)
        assert r.status_code == 202, r.text
        sample = r.json()
        prefix = f"jobs/{job['id']}/samples/{sample['id']}/"
        cluster.objects[("ckpt", prefix + "result.json")] = json.dumps({"step": 3, "files": {"grid.png": 1}}).encode()
        cluster.ray_status[f"rcm-s-{sample['id']}"] = ClusterJobStatus("SUCCEEDED")
        done = client.get(f"/v1/jobs/{job['id']}/samples/{sample['id']}", headers=h).json()
        assert done["state"] == "SUCCEEDED" and done["step"] == 3 and list(done["files"]) == ["grid.png"]
        ds = client.post("/v1/datasets", json=DATASET, headers=h)
        assert ds.status_code == 202, ds.text
        assert client.post("/v1/datasets", json=DATASET, headers=h).status_code == 409
        assert client.get(f"/v1/datasets/{DATASET['name']}", headers=h).json()["state"] == "QUEUED"
