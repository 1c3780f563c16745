"""A real S3-protocol server on loopback for the object-storage tests (moto's threaded server).

``start()`` runs ``moto.server.ThreadedMotoServer`` on 127.0.0.1 with a free port and sets
the environment exactly as a user of boto3 / s3fs would: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (botocore, and so
s3fs, honour it). Ray workers started afterwards inherit these variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

BUCKET = "kdstore-test"


@dataclass(frozen=True, kw_only=True)
class S3Server:
    endpoint: str
    bucket: str
    server: object

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])


def start() -> S3Server:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="kdstore-test",
        AWS_SECRET_ACCESS_KEY="kdstore-test",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return S3Server(endpoint=endpoint, bucket=BUCKET, server=server)
