"""A real S3-compatible server for tests: moto's server mode (MinIO is not installable here),
reached through boto3 with an endpoint URL exactly as a MinIO user sets it; started on a free
loopback port in its own process group and stopped by its pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from helpers import free_port, wait_for_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "loft-test",
    "AWS_SECRET_ACCESS_KEY": "loft-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        if not wait_for_port(self.port):
            self.stop()
            raise RuntimeError("moto_server did not start")

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )  # fmt: skip

    def new_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
